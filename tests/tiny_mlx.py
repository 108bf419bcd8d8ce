"""Tiny random Gemma 4 targets and drafters built directly in MLX (no torch).

Used where a test needs many models or a tiny vocabulary (sampling statistics,
property tests); HF-built fixtures in ``hf_ref.py`` cover parity with HF.
"""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_mtp.models.gemma4 import Model, TextConfig
from mlx_mtp.models.gemma4_assistant import AssistantConfig, Drafter


def target_config(
    vocab: int = 64,
    hidden: int = 32,
    layers: int = 6,
    window: int = 8,
    kv_shared: int = 2,
    ple: int = 8,
    moe: bool = False,
    k_eq_v: bool = False,
) -> dict:
    types = ["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3)
    types = (types + ["sliding_attention"] * layers)[:layers]
    types[-1] = "full_attention"
    cfg = {
        "model_type": "gemma4_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "global_head_dim": 16,
        "sliding_window": window,
        "layer_types": types,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": ple,
        "vocab_size_per_layer_input": vocab,
        "num_kv_shared_layers": kv_shared,
        "use_double_wide_mlp": kv_shared > 0,
        "attention_k_eq_v": k_eq_v,
        "num_global_key_value_heads": 1 if k_eq_v else None,
        "max_position_embeddings": 4096,
    }
    if moe:
        cfg.update(
            enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=hidden
        )
    return cfg


def drafter_config(target: dict, hidden: int = 16, layers: int = 2, centroids: int = 0) -> dict:
    text = dict(target)
    text.update(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=layers,
        use_double_wide_mlp=False,
        enable_moe_block=False,
        final_logit_softcapping=None,
    )
    return {
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": target["hidden_size"],
        "use_ordered_embeddings": centroids > 0,
        "num_centroids": centroids or 2048,
        "centroid_intermediate_top_k": 2,
        "text_config": text,
    }


def _perturb(module: nn.Module, seed: int, dtype=mx.float32) -> None:
    """Random norms and layer scalars so every term matters; cast floats to ``dtype``."""
    params = []
    for i, (name, p) in enumerate(tree_flatten(module.parameters())):
        if not mx.issubdtype(p.dtype, mx.floating):
            params.append((name, p))
            continue
        k = mx.random.key(seed * 100003 + i)
        if name.endswith("norm.weight") or name.endswith("scale"):
            p = 1.0 + 0.3 * mx.random.normal(p.shape, key=k)
        elif name.endswith("layer_scalar"):
            p = mx.random.uniform(0.5, 1.5, p.shape, key=k)
        else:
            p = 0.5 * mx.random.normal(p.shape, key=k) / (p.shape[-1] ** 0.5)
        params.append((name, p.astype(dtype)))
    module.update(tree_unflatten(params))
    mx.eval(module.parameters())


def make_target(seed: int = 0, dtype=mx.float32, **kw) -> Model:
    model = Model(TextConfig.from_dict(target_config(**kw)))
    _perturb(model, seed, dtype)
    return model


def make_pair(seed: int = 0, dtype=mx.float32, centroids: int = 0, **kw) -> Tuple[Model, Drafter]:
    tcfg = target_config(**kw)
    model = Model(TextConfig.from_dict(tcfg))
    _perturb(model, seed, dtype)
    drafter = Drafter(AssistantConfig.from_dict(drafter_config(tcfg, centroids=centroids)))
    _perturb(drafter, seed + 1000, dtype)
    if centroids:
        perm = mx.random.permutation(tcfg["vocab_size"], key=mx.random.key(seed))
        drafter.masked_embedding.token_ordering = perm.astype(mx.int32)
    return model, drafter
