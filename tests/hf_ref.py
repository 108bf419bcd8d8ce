"""HuggingFace-transformers reference side of the mlx-mtp test-suite.

Everything that needs torch / transformers lives here (import this module only from tests that guard with
``pytest.importorskip("torch")``).  It provides

* :func:`patch_transformers` -- the runtime fix of ``kv_sharing_modes`` (spec section 5.6) without which
  transformers 5.23 can neither build a Gemma 4 assistant nor return ``shared_kv_states`` from a target
  without KV sharing (26B / 31B / 12B);
* tiny random-weight fixture builders (:func:`build_target`, :func:`build_assistant`) that write float32
  safetensors checkpoints in the on-disk layout Google ships (multimodal wrapper keys
  ``model.language_model.*`` plus tiny vision / audio towers, ``global_head_dim`` style config);
* reference computations (:func:`hf_target_forward`, :func:`hf_drafter_step`, :func:`hf_greedy`,
  :func:`hf_assisted_greedy`), numpy in / numpy out, float32.

All configs used are module-level dicts (:data:`TARGET_TEXT_CONFIGS`, :data:`ASSISTANT_TEXT_CONFIGS`, ...), so
tests can read geometry (producers, head dims, window) without parsing config files.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

S = "sliding_attention"
F = "full_attention"

VARIANTS = ("e2b", "e4b", "26b", "31b", "12b", "text")
MULTIMODAL_VARIANTS = ("e2b", "e4b", "26b", "31b", "12b")

# ----------------------------------------------------------------------------------------------------------
# Fixture geometry.  Keys are the kwargs given to the transformers text config class.  `global_head_dim` and
# `num_global_key_value_heads` are init-only kwargs (5.23 turns them into `per_layer_config`; the builders
# write them back into config.json the way Google's checkpoints carry them).
# ----------------------------------------------------------------------------------------------------------

TARGET_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    # E2B-like: PLE, KV sharing (consumers 5 S, 6 S, 7 F; producers 3 S / 4 F), double-wide MLP, MQA, 4:1 pattern.
    "e2b": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "layer_types": [S, S, S, S, F, S, S, F],
        "sliding_window": 8,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": 512,
        "num_kv_shared_layers": 3,
        "use_double_wide_mlp": True,
        "enable_moe_block": False,
        "use_bidirectional_attention": None,
        "max_position_embeddings": 131072,
    },
    # E4B-like: PLE, KV sharing (consumers 6 S, 7 F; producers 4 S / 5 F), 2 KV heads, 5:1 pattern.
    "e4b": {
        "vocab_size": 384,
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "layer_types": [S, S, S, S, S, F, S, F],
        "sliding_window": 12,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 12,
        "vocab_size_per_layer_input": 384,
        "num_kv_shared_layers": 2,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "use_bidirectional_attention": None,
        "max_position_embeddings": 131072,
    },
    # 26B-A4B-like: MoE + dense branch, k_eq_v with 1 global KV head vs 2 sliding KV heads, no PLE, no sharing.
    "26b": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "layer_types": [S, S, S, S, S, F],
        "sliding_window": 8,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 262144,  # as in Google's config: present but unused
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": True,
        "num_experts": 8,
        "top_k_experts": 3,
        "moe_intermediate_size": 32,
        "use_bidirectional_attention": "vision",
        "max_position_embeddings": 262144,
    },
    # 31B-like: dense, k_eq_v, 4 sliding / 2 global KV heads, producers 6 S / 7 F.
    "31b": {
        "vocab_size": 320,
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 2,
        "attention_k_eq_v": True,
        "layer_types": [S, S, S, S, S, F, S, F],
        "sliding_window": 16,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 262144,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "use_bidirectional_attention": "vision",
        "max_position_embeddings": 262144,
    },
    # 12B-like (`gemma4_unified_text`): no PLE / MoE code at all; k_eq_v, 2 sliding / 1 global KV head;
    # head dims 24 / 48 (not powers of two on purpose).
    "12b": {
        "vocab_size": 448,
        "hidden_size": 80,
        "intermediate_size": 160,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "global_head_dim": 48,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "layer_types": [S, S, S, S, S, F],
        "sliding_window": 10,
        "final_logit_softcapping": 30.0,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "use_bidirectional_attention": "vision",
        "max_position_embeddings": 262144,
    },
    # Text-only Gemma4ForCausalLM (`gemma4_text`, keys `model.*`), E2B-like; consumers 4 S / 5 F, producers 2 S / 3 F.
    "text": {
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "layer_types": [S, S, S, F, S, F],
        "sliding_window": 16,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": 384,
        "num_kv_shared_layers": 2,
        "use_double_wide_mlp": True,
        "enable_moe_block": False,
        "use_bidirectional_attention": None,
        "max_position_embeddings": 131072,
    },
}

# Tiny multimodal towers (only there so that their keys exist in the checkpoint and must be dropped by a loader).
VISION_CONFIGS: dict[str, dict[str, Any] | None] = {
    "gemma4": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "patch_size": 4,
        "pooling_kernel_size": 2,
        "position_embedding_size": 64,
    },
    "gemma4_unified": {
        "patch_size": 2,
        "pooling_kernel_size": 2,
        "mm_embed_dim": 32,
        "mm_posemb_size": 16,
        "output_proj_dims": 32,
    },
}
AUDIO_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma4": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "subsampling_conv_channels": [8, 4],
        "conv_kernel_size": 3,
        "output_proj_dims": 32,
    },
    "gemma4_unified": {"audio_embed_dim": 16},
}
# Which variants carry an audio tower (as Google's E2B / E4B / 12B do); all multimodal variants carry vision.
HAS_AUDIO = {"e2b": True, "e4b": True, "26b": False, "31b": False, "12b": True}

ASSISTANT_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "e2b": {
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "layer_types": [S, S, S, F],
        "sliding_window": 8,
    },
    "e4b": {
        "vocab_size": 384,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "layer_types": [S, S, F],
        "sliding_window": 12,
    },
    "26b": {
        "vocab_size": 512,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "layer_types": [S, S, S, F],
        "sliding_window": 8,
    },
    "31b": {
        "vocab_size": 320,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 2,
        "attention_k_eq_v": True,
        "layer_types": [S, S, F],
        "sliding_window": 16,
    },
    "12b": {
        "vocab_size": 448,
        "hidden_size": 40,
        "intermediate_size": 80,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "global_head_dim": 48,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "layer_types": [S, S, S, F],
        "sliding_window": 10,
    },
    "text": {
        "vocab_size": 384,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "layer_types": [S, F],
        "sliding_window": 16,
    },
}
# Fields common to every assistant text config (Gemma4AssistantConfig.validate_architecture needs them).
_ASSISTANT_TEXT_COMMON: dict[str, Any] = {
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "final_logit_softcapping": None,
}
# Outer assistant fields: centroid head (use_ordered_embeddings) for E-models, dense head for the big ones.
ASSISTANT_OUTER_CONFIGS: dict[str, dict[str, Any]] = {
    "e2b": {
        "use_ordered_embeddings": True,
        "num_centroids": 16,
        "centroid_intermediate_top_k": 4,
    },  # 32 tokens/centroid
    "e4b": {
        "use_ordered_embeddings": True,
        "num_centroids": 12,
        "centroid_intermediate_top_k": 3,
    },  # 32 tokens/centroid
    "26b": {
        "use_ordered_embeddings": False,
        "num_centroids": 2048,
        "centroid_intermediate_top_k": 32,
    },
    "31b": {
        "use_ordered_embeddings": False,
        "num_centroids": 2048,
        "centroid_intermediate_top_k": 32,
    },
    "12b": {
        "use_ordered_embeddings": False,
        "num_centroids": 2048,
        "centroid_intermediate_top_k": 32,
    },
    "text": {
        "use_ordered_embeddings": True,
        "num_centroids": 8,
        "centroid_intermediate_top_k": 2,
    },  # 48 tokens/centroid
}
# Centroid geometry used when build_assistant(..., centroid=True) overrides a dense-head default.
_CENTROID_OVERRIDE = {"26b": (16, 4), "31b": (10, 3), "12b": (14, 4)}

NUM_ASSISTANT_TOKENS = 4
# std of embed_tokens = EMBED_STD_FACTOR / sqrt(width)
EMBED_STD_FACTOR = 0.5

# ----------------------------------------------------------------------------------------------------------
# Geometry helpers (pure python, no torch)
# ----------------------------------------------------------------------------------------------------------


def producers(text_cfg: dict[str, Any]) -> dict[str, int]:
    """Index of the K/V producer ("store" layer) of each layer type, per spec section 1.1."""
    n = text_cfg["num_hidden_layers"]
    first_shared = n - (text_cfg.get("num_kv_shared_layers") or 0)
    out = {}
    for t in (S, F):
        idx = [i for i in range(first_shared) if text_cfg["layer_types"][i] == t]
        out[t] = idx[-1]
    return out


def kv_geometry(text_cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(num KV heads, head dim) per layer type."""
    n_full = text_cfg["num_key_value_heads"]
    if text_cfg.get("attention_k_eq_v") and text_cfg.get("num_global_key_value_heads") is not None:
        n_full = text_cfg["num_global_key_value_heads"]
    return {
        S: (text_cfg["num_key_value_heads"], text_cfg["head_dim"]),
        F: (n_full, text_cfg["global_head_dim"]),
    }


def target_family(variant: str) -> str:
    return "gemma4_unified" if variant == "12b" else "gemma4"


# ----------------------------------------------------------------------------------------------------------
# transformers 5.23 runtime patch (spec 5.6)
# ----------------------------------------------------------------------------------------------------------

_PATCH_MARK = "_mlx_mtp_kv_sharing_patch"


def _patched_kv_sharing_modes_factory(orig_fget):
    def kv_sharing_modes(self):
        n = self.num_hidden_layers
        n_shared = self.num_kv_shared_layers or 0
        if n_shared >= n:
            # Every layer is a consumer (all assistants): the original raises ValueError here.
            return ["reuse"] * n
        if n_shared == 0:
            # No sharing (26B / 31B / 12B targets): the original returns all-None, so nothing would be stored for
            # an assistant. Mark the last layer of each type as the producer.
            modes: list[str | None] = [None] * n
            types = list(self.layer_types)[:n]
            for t in set(types):
                modes[max(i for i, lt in enumerate(types) if lt == t)] = "store"
            return modes
        return orig_fget(self)

    setattr(kv_sharing_modes, _PATCH_MARK, True)
    kv_sharing_modes.__wrapped__ = orig_fget
    return kv_sharing_modes


def _text_config_classes() -> list[type]:
    classes = []
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    classes.append(Gemma4TextConfig)
    try:
        from transformers.models.gemma4_unified.configuration_gemma4_unified import (
            Gemma4UnifiedTextConfig,
        )

        classes.append(Gemma4UnifiedTextConfig)
    except ImportError:  # older transformers without the unified model
        pass
    return classes


def patch_transformers() -> None:
    """Idempotently monkey-patch ``kv_sharing_modes`` of Gemma4TextConfig (and Gemma4UnifiedTextConfig).

    * all layers shared  -> ``["reuse"] * N``;
    * none shared        -> last layer of each type ``"store"``, others ``None``;
    * otherwise          -> the original result (``None`` / ``"store"`` producers / ``"reuse"`` consumers).

    Must run before any model is constructed (attention layers read the property in ``__init__``).
    """
    for cls in _text_config_classes():
        prop = cls.__dict__.get("kv_sharing_modes")
        if prop is None or not isinstance(prop, property):
            continue
        if getattr(prop.fget, _PATCH_MARK, False):
            continue
        cls.kv_sharing_modes = property(_patched_kv_sharing_modes_factory(prop.fget))


def is_patched() -> bool:
    return all(
        getattr(cls.__dict__["kv_sharing_modes"].fget, _PATCH_MARK, False)
        for cls in _text_config_classes()
    )


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------


def _text_kwargs(variant: str) -> dict[str, Any]:
    kw = copy.deepcopy(TARGET_TEXT_CONFIGS[variant])
    return kw


def _assistant_text_kwargs(variant: str) -> dict[str, Any]:
    kw = copy.deepcopy(ASSISTANT_TEXT_CONFIGS[variant])
    kw.update(_ASSISTANT_TEXT_COMMON)
    if variant == "12b":
        # gemma4_unified_text has no PLE / MoE fields at all
        for k in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block"):
            kw.pop(k)
    kw["num_kv_shared_layers"] = kw["num_hidden_layers"]
    return kw


def make_target_config(variant: str):
    """The transformers config object of a target variant (patch applied)."""
    patch_transformers()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    text_kw = _text_kwargs(variant)
    if variant == "text":
        from transformers import Gemma4TextConfig

        return Gemma4TextConfig(**text_kw)
    if variant == "12b":
        from transformers import Gemma4UnifiedConfig

        return Gemma4UnifiedConfig(
            text_config=text_kw,
            vision_config=copy.deepcopy(VISION_CONFIGS["gemma4_unified"]),
            audio_config=copy.deepcopy(AUDIO_CONFIGS["gemma4_unified"])
            if HAS_AUDIO[variant]
            else None,
        )
    from transformers import Gemma4Config

    return Gemma4Config(
        text_config=text_kw,
        vision_config=copy.deepcopy(VISION_CONFIGS["gemma4"]),
        audio_config=copy.deepcopy(AUDIO_CONFIGS["gemma4"]) if HAS_AUDIO[variant] else None,
    )


def make_assistant_config(variant: str, centroid: bool | None = None):
    patch_transformers()
    text_kw = _assistant_text_kwargs(variant)
    tgt = TARGET_TEXT_CONFIGS[variant]
    outer = copy.deepcopy(ASSISTANT_OUTER_CONFIGS[variant])
    if centroid is not None and centroid != outer["use_ordered_embeddings"]:
        outer["use_ordered_embeddings"] = centroid
        if centroid:
            outer["num_centroids"], outer["centroid_intermediate_top_k"] = _CENTROID_OVERRIDE[
                variant
            ]
    if outer["use_ordered_embeddings"]:
        assert text_kw["vocab_size"] % outer["num_centroids"] == 0
    if variant == "12b":
        from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedTextConfig

        return Gemma4UnifiedAssistantConfig(
            text_config=Gemma4UnifiedTextConfig(**text_kw),
            backbone_hidden_size=tgt["hidden_size"],
            **outer,
        )
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    return Gemma4AssistantConfig(
        text_config=Gemma4TextConfig(**text_kw), backbone_hidden_size=tgt["hidden_size"], **outer
    )


def _torch():
    """Import torch, limited to MLX_MTP_TORCH_THREADS (default 1) threads: tiny models run several times faster
    single-threaded, especially on a shared machine."""
    import torch

    n = int(os.environ.get("MLX_MTP_TORCH_THREADS", "1"))
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch


def _randomize_(module, seed: int, *, ple_width: int = 0) -> None:
    """Re-initialise every parameter / persistent buffer of a text stack (or assistant) so each term matters.

    * norm weights (every 1-D parameter) ``1 + 0.3·N(0,1)``, times ``hd^-1/4`` for q_norm / k_norm;
      ``router.scale`` likewise;
    * ``layer_scalar`` buffers and ``router.per_expert_scale`` ``U(0.5, 1.5)``;
    * ``embed_tokens`` ``N(0, 0.25/H)`` (tied LM head -> logits of std ≈ 0.5, max ≈ 2.5: the soft-cap still moves
      them by ~5e-3; larger embeddings make random tied models copy their input token, i.e. degenerate greedy
      loops);
    * ``embed_tokens_per_layer`` ``N(0, 1/P)`` (×√P in the model -> unit scale);
    * ``router.proj`` ``N(0, 2²)`` (well separated expert choice); ``per_layer_input_gate`` ``N(0, 0.25/H)``;
    * every other matrix / 3-D expert tensor ``N(0, 1/fan_in)`` with fan_in = last axis;
    * ``masked_embedding.token_ordering`` a random permutation.
    """
    torch = _torch()

    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def rand(shape):
        return torch.rand(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in module.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("router.per_expert_scale"):
                new = 0.5 + rand(shape)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # attention uses scaling 1.0: shrink q/k norm weights by hd^-1/4 each so scores are O(1) like a
                # 1/sqrt(hd)-scaled attention (unit weights make the fp32 result needlessly ill-conditioned)
                new = (1.0 + 0.3 * randn(shape)) * shape[0] ** -0.25
            elif name.endswith("router.scale") or p.ndim == 1:
                new = 1.0 + 0.3 * randn(shape)
            elif name.endswith("per_layer_input_gate.weight"):
                # small gates keep gelu out of its tail, where fp32 1+tanh(u) cancels and the PLE post-norm
                # would blow the cancellation error up
                new = 0.5 * randn(shape) / math.sqrt(shape[-1])
            elif name.endswith("embed_tokens_per_layer.weight"):
                new = randn(shape) / math.sqrt(max(ple_width, 1))
            elif name.endswith("embed_tokens.weight"):
                new = randn(shape) * (EMBED_STD_FACTOR / math.sqrt(shape[-1]))
            elif name.endswith("router.proj.weight"):
                new = 2.0 * randn(shape)
            else:
                new = randn(shape) / math.sqrt(shape[-1])
            p.copy_(new.to(p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + rand(tuple(b.shape)))
            elif name.endswith("token_ordering"):
                b.copy_(torch.randperm(b.numel(), generator=g).to(b.dtype))


def _googlify_text_config(tc: dict[str, Any], spec: dict[str, Any]) -> None:
    """Rewrite 5.23's ``per_layer_config`` as Google's ``global_head_dim`` / ``num_global_key_value_heads``."""
    tc.pop("per_layer_config", None)
    tc["global_head_dim"] = spec["global_head_dim"]
    tc["num_global_key_value_heads"] = spec.get("num_global_key_value_heads")


def _rewrite_config(path: Path, spec: dict[str, Any], config_style: str, nested: bool) -> None:
    if config_style == "hf":
        return
    if config_style != "google":
        raise ValueError(f"config_style must be 'google' or 'hf', got {config_style!r}")
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    _googlify_text_config(cfg["text_config"] if nested else cfg, spec)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_reload_config(path: Path, expected) -> None:
    """The rewritten config.json must give transformers the same per-layer geometry."""
    from transformers import AutoConfig

    got = AutoConfig.from_pretrained(str(path))
    exp_t = expected.get_text_config() if hasattr(expected, "get_text_config") else expected
    got_t = got.get_text_config()
    for i in range(exp_t.num_hidden_layers):
        a, b = exp_t.per_layer_config[i], got_t.per_layer_config[i]
        assert (a.head_dim, a.num_key_value_heads) == (b.head_dim, b.num_key_value_heads), (path, i)
    assert list(got_t.kv_sharing_modes) == list(exp_t.kv_sharing_modes), path


_TOKENIZER_CORPUS_TEXT = """\
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules. Errors should never pass silently.
In the face of ambiguity, refuse the temptation to guess. Now is better than never.
The quick brown fox jumps over the lazy dog while the target model verifies the drafted tokens.
Speculative decoding drafts several tokens and the target checks them in one forward pass.
def forward(self, input_ids, cache=None):
    hidden = self.embed_tokens(input_ids) * self.embed_scale
    for layer in self.layers:
        hidden = layer(hidden, cache=cache)
    return self.norm(hidden)
import numpy as np
import mlx.core as mx
for i in range(10):
    print(i, i * i, [j for j in range(i) if j % 2 == 0])
"""


def _tokenizer_corpus() -> list[str]:
    return _TOKENIZER_CORPUS_TEXT.splitlines() * 3


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A tiny byte-level BPE tokenizer (<pad>=0, <eos>=1, <bos>=2, <unk>=3, <bos> prepended), ≤ vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    assert tok.get_vocab_size() <= vocab_size, (tok.get_vocab_size(), vocab_size)
    assert [tok.token_to_id(s) for s in specials] == [0, 1, 2, 3]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(path))
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
            },
            indent=2,
        )
        + "\n"
    )


def _text_module(model, variant: str):
    return model.model if variant == "text" else model.model.language_model


def build_target(
    variant: str, path: Path, seed: int = 0, *, config_style: str = "google", tokenizer: bool = True
) -> Path:
    """Build and save a tiny random-weight target of ``variant`` (see :data:`TARGET_TEXT_CONFIGS`) at ``path``.

    Multimodal variants are saved as ``Gemma4ForConditionalGeneration`` / ``Gemma4UnifiedForConditionalGeneration``
    (text weights under ``model.language_model.``), "text" as ``Gemma4ForCausalLM`` (``model.``). float32
    safetensors. ``config_style="google"`` writes ``global_head_dim`` / ``num_global_key_value_heads`` like Google's
    checkpoints; ``"hf"`` keeps what transformers 5.23 writes (``per_layer_config``).
    """
    torch = _torch()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_target_config(variant)
    torch.manual_seed(seed)
    if variant == "text":
        from transformers import Gemma4ForCausalLM as cls
    elif variant == "12b":
        from transformers import Gemma4UnifiedForConditionalGeneration as cls
    else:
        from transformers import Gemma4ForConditionalGeneration as cls
    model = cls(cfg).to(torch.float32).eval()
    spec = TARGET_TEXT_CONFIGS[variant]
    _randomize_(
        _text_module(model, variant),
        seed * 1000 + 17,
        ple_width=spec.get("hidden_size_per_layer_input") or 0,
    )
    model.save_pretrained(str(path))
    _rewrite_config(path, spec, config_style, nested=variant != "text")
    _check_reload_config(path, cfg)
    _check_saved_tensors(path, model)
    if tokenizer:
        save_tokenizer(path, spec["vocab_size"])
    return path


def build_assistant(
    variant: str,
    target_path: Path | None,
    path: Path,
    seed: int = 0,
    centroid: bool | None = None,
    *,
    config_style: str = "google",
    tokenizer: bool = True,
) -> Path:
    """Build and save a tiny ``Gemma4AssistantForCausalLM`` (``Gemma4UnifiedAssistantForCausalLM`` for "12b")
    paired with the target ``variant`` (same vocab, KV heads / head dims per type and sliding window;
    ``backbone_hidden_size`` = target hidden). ``centroid`` overrides the default head choice
    (centroid head for e2b / e4b / text, dense for 26b / 31b / 12b). Writes generation_config.json with
    ``num_assistant_tokens`` 4."""
    torch = _torch()
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if target_path is not None:
        # sanity: the paired target must have the geometry this assistant was designed for
        tcfg = json.loads((Path(target_path) / "config.json").read_text())
        ttc = tcfg.get("text_config", tcfg)
        assert ttc["hidden_size"] == TARGET_TEXT_CONFIGS[variant]["hidden_size"], (
            "target/assistant variant mismatch"
        )
        assert ttc["vocab_size"] == TARGET_TEXT_CONFIGS[variant]["vocab_size"], (
            "target/assistant variant mismatch"
        )
    cfg = make_assistant_config(variant, centroid)
    tgt_geo = kv_geometry(TARGET_TEXT_CONFIGS[variant])
    assert kv_geometry(ASSISTANT_TEXT_CONFIGS[variant]) == tgt_geo
    torch.manual_seed(seed + 1)
    if variant == "12b":
        from transformers import Gemma4UnifiedAssistantForCausalLM as cls
    else:
        from transformers import Gemma4AssistantForCausalLM as cls
    model = cls(cfg).to(torch.float32).eval()
    spec = ASSISTANT_TEXT_CONFIGS[variant]
    _randomize_(model, seed * 1000 + 29)
    model.save_pretrained(str(path))
    _rewrite_config(path, spec, config_style, nested=True)
    _check_reload_config(path, cfg)
    _check_saved_tensors(path, model)
    GenerationConfig(
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        do_sample=False,
        num_assistant_tokens=NUM_ASSISTANT_TOKENS,
        num_assistant_tokens_schedule="constant",
    ).save_pretrained(str(path))
    if tokenizer:
        save_tokenizer(path, spec["vocab_size"])
    return path


def _check_saved_tensors(path: Path, model) -> None:
    """Every saved tensor equals the in-memory one (so perturbed norms / layer_scalars really are on disk)."""
    torch = _torch()
    from safetensors.torch import load_file

    saved = load_file(str(path / "model.safetensors"))
    state = model.state_dict()
    # save_pretrained may rename keys (12B vision embedder); compare those that exist under the same name
    common = [k for k in saved if k in state]
    assert any("layer_scalar" in k for k in common), "no layer_scalar saved?"
    for k in common:
        assert torch.equal(saved[k], state[k].to(saved[k].dtype)), (
            f"saved tensor {k} differs from model"
        )


# ----------------------------------------------------------------------------------------------------------
# Reference computations
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def load_hf(path: str):
    """Load (and cache) a saved model in float32, eval mode, with the patch applied."""
    patch_transformers()
    torch = _torch()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def _model(path) -> Any:
    return load_hf(str(Path(path).resolve()))


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


def hf_target_embed(path, ids) -> np.ndarray:
    """The target's scaled input embedding (``E[ids]·√H``, what the MTP loop feeds the drafter), [len(ids), H]."""
    torch = _torch()

    m = _model(path)
    with torch.no_grad():
        e = m.get_input_embeddings()(torch.tensor([list(map(int, ids))], dtype=torch.long))
    return _np(e[0])


def hf_target_forward(path, ids) -> dict[str, Any]:
    """One full-sequence forward of a target from scratch.

    Returns ``logits`` [S, V] (soft-capped), ``hidden`` [S, H] (``hidden_states[-1]`` = after the final norm),
    ``embeds`` [S, H] (scaled input embeddings), and ``shared_kv`` {"sliding_attention": (K, V),
    "full_attention": (K, V)} with K/V [1, nKV_t, S, hd_t] from the producer layers (all S positions).
    """
    torch = _torch()

    m = _model(path)
    x = torch.tensor([list(map(int, ids))], dtype=torch.long)
    with torch.no_grad():
        out = m(
            input_ids=x, output_hidden_states=True, return_shared_kv_states=True, use_cache=True
        )
        emb = m.get_input_embeddings()(x)
    skv = out.shared_kv_states
    if skv is None or set(skv.keys()) != {S, F}:
        raise RuntimeError(
            f"target returned shared_kv_states={None if skv is None else list(skv.keys())}"
        )
    return {
        "logits": _np(out.logits[0]),
        "hidden": _np(out.hidden_states[-1][0]),
        "embeds": _np(emb[0]),
        "shared_kv": {k: (_np(v[0]), _np(v[1])) for k, v in skv.items()},
    }


def hf_drafter_step(
    path, token_embedding, hidden, shared_kv, position: int
) -> tuple[np.ndarray, np.ndarray]:
    """One assistant forward exactly as ``SinglePositionMultiTokenCandidateGenerator`` calls it.

    ``token_embedding`` / ``hidden``: [Hb] (any shape with Hb elements) -- the target's scaled embedding of the
    last token and the carried hidden (target post-norm hidden, or the previous step's ``post_projection``
    output). ``shared_kv``: {type: (K [1, nKV, S_t, hd], V)} already cropped by the caller.
    ``position``: query position (``len(input_ids) - 1``). batch 1, attention_mask None (generate drops the
    all-ones mask). Returns (logits [V], post_projection output [Hb]); for the centroid head unselected tokens
    hold ``min(selected) - 1`` as in HF.
    """
    torch = _torch()

    m = _model(path)
    e = torch.from_numpy(np.asarray(token_embedding, dtype=np.float32).reshape(1, 1, -1))
    h = torch.from_numpy(np.asarray(hidden, dtype=np.float32).reshape(1, 1, -1))
    skv = {
        k: (
            torch.from_numpy(np.ascontiguousarray(np.asarray(kv[0], dtype=np.float32))),
            torch.from_numpy(np.ascontiguousarray(np.asarray(kv[1], dtype=np.float32))),
        )
        for k, kv in shared_kv.items()
    }
    with torch.no_grad():
        out = m(
            inputs_embeds=torch.cat([e, h], dim=-1),
            attention_mask=None,
            position_ids=torch.tensor([[int(position)]], dtype=torch.long),
            shared_kv_states=skv,
            use_cache=False,
        )
    return _np(out.logits[0, 0]), _np(out.last_hidden_state[0, 0])


def hf_first_round(target_path, assistant_path, ids, k: int) -> dict[str, Any]:
    """Prefill ``ids`` and run the ``k`` drafting steps of round 1 like HF does (clean: KV of positions < p).

    Returns ``bonus`` (target argmax after the prompt), ``position`` p = len(ids), and per step lists of
    ``inputs`` (token_embedding [Hb], hidden [Hb]), ``logits`` [V], ``post_projection`` [Hb], ``tokens``.
    ``shared_kv`` is the prefill's producer K/V (positions 0 … p-1).
    """
    ref = hf_target_forward(target_path, ids)
    bonus = int(np.argmax(ref["logits"][-1]))
    p = len(ids)
    tok, hidden = bonus, ref["hidden"][-1]
    steps: dict[str, list] = {"inputs": [], "logits": [], "post_projection": [], "tokens": []}
    for _ in range(k):
        emb = hf_target_embed(target_path, [tok])[0]
        logits, hidden_next = hf_drafter_step(assistant_path, emb, hidden, ref["shared_kv"], p)
        steps["inputs"].append((emb, hidden))
        steps["logits"].append(logits)
        steps["post_projection"].append(hidden_next)
        tok = int(np.argmax(logits))
        steps["tokens"].append(tok)
        hidden = hidden_next
    return {"bonus": bonus, "position": p, "shared_kv": ref["shared_kv"], **steps}


def _gen_kwargs(max_new_tokens: int, stop_at_eos: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": False,
        "pad_token_id": 0,
    }
    if not stop_at_eos:
        # random tiny models may emit <eos>; by default generate exactly max_new_tokens tokens
        kw["min_new_tokens"] = int(max_new_tokens)
    return kw


def hf_greedy(path, ids, max_new_tokens: int, *, stop_at_eos: bool = False) -> list[int]:
    """Plain greedy ``generate`` (fp32); returns only the new tokens.

    With ``stop_at_eos=False`` (default) EOS is suppressed via ``min_new_tokens`` so exactly
    ``max_new_tokens`` tokens come back (greedy argmax over all other tokens)."""
    torch = _torch()

    m = _model(path)
    x = torch.tensor([list(map(int, ids))], dtype=torch.long)
    with torch.no_grad():
        out = m.generate(x, **_gen_kwargs(max_new_tokens, stop_at_eos))
    return [int(t) for t in out[0, x.shape[1] :].tolist()]


@contextlib.contextmanager
def _instrument_mtp(stats: dict[str, Any]):
    from transformers.generation.candidate_generator import (
        SinglePositionMultiTokenCandidateGenerator as G,
    )

    orig_get = G.__dict__.get("get_candidates")
    orig_upd = G.__dict__.get("update_candidate_strategy")
    base_get = G.get_candidates
    base_upd = G.update_candidate_strategy

    def get_candidates(self, input_ids, *args, **kwargs):
        cand_ids, cand_logits = base_get(self, input_ids, *args, **kwargs)
        n = int(cand_ids.shape[1] - input_ids.shape[1])
        stats["_pending"] = n
        if n > 0:
            stats["drafted"] += n
            stats["rounds"] += 1
            stats["drafts"].append([int(t) for t in cand_ids[0, input_ids.shape[1] :].tolist()])
        else:
            stats["undrafted_forwards"] += 1
        return cand_ids, cand_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        n_drafted = stats.pop("_pending", 0)
        n = int(num_matches)
        if n_drafted > 0:
            stats["accepted"] += n
            stats["per_round"].append((n_drafted, n))
        return base_upd(self, input_ids, scores, num_matches)

    G.get_candidates = get_candidates
    G.update_candidate_strategy = update_candidate_strategy
    try:
        yield stats
    finally:
        for name, orig in (("get_candidates", orig_get), ("update_candidate_strategy", orig_upd)):
            if orig is None:
                delattr(G, name)
            else:
                setattr(G, name, orig)


def hf_assisted_greedy(
    target_path,
    assistant_path,
    ids,
    max_new_tokens: int,
    k: int = NUM_ASSISTANT_TOKENS,
    *,
    stop_at_eos: bool = False,
) -> dict[str, Any]:
    """HF MTP assisted greedy generation (``generate(..., assistant_model=...)``) with instrumentation.

    Returns a dict: ``tokens`` (new tokens only), ``rounds`` (drafting rounds, i.e. target forwards with
    drafts), ``target_forwards`` (all target forward calls, prefill included), ``drafted`` and ``accepted``
    (total drafts proposed / accepted), ``per_round`` [(drafted, accepted)], ``drafts`` (the drafted token ids of
    each round), ``tokens_per_target_forward`` (= len(tokens) / target_forwards) and ``accepted_per_round``.
    ``undrafted_forwards`` counts target forwards without drafts (the prefill, and the last step when only one
    token of budget is left). Invariants: ``target_forwards == rounds + undrafted_forwards`` and
    ``len(tokens) == target_forwards + accepted``.
    """
    torch = _torch()

    target = _model(target_path)
    draft = _model(assistant_path)
    x = torch.tensor([list(map(int, ids))], dtype=torch.long)
    stats: dict[str, Any] = {
        "rounds": 0,
        "drafted": 0,
        "accepted": 0,
        "target_forwards": 0,
        "per_round": [],
        "drafts": [],
        "undrafted_forwards": 0,
    }

    def _count(_mod, _args, _kwargs, _out):
        stats["target_forwards"] += 1

    old_k = draft.generation_config.num_assistant_tokens
    draft.generation_config.num_assistant_tokens = int(k)
    handle = target.register_forward_hook(_count, with_kwargs=True)
    try:
        with _instrument_mtp(stats), torch.no_grad():
            out = target.generate(
                x, assistant_model=draft, **_gen_kwargs(max_new_tokens, stop_at_eos)
            )
    finally:
        handle.remove()
        draft.generation_config.num_assistant_tokens = old_k
    stats.pop("_pending", None)
    tokens = [int(t) for t in out[0, x.shape[1] :].tolist()]
    stats["tokens"] = tokens
    stats["tokens_per_target_forward"] = len(tokens) / max(stats["target_forwards"], 1)
    stats["accepted_per_round"] = stats["accepted"] / max(stats["rounds"], 1)
    return stats


def random_ids(n: int, vocab_size: int, seed: int = 0, bos: bool = True) -> list[int]:
    """Deterministic test prompt: <bos> + ids in [4, vocab) (no pad/eos/bos/unk inside)."""
    rng = np.random.default_rng(seed)
    body = rng.integers(4, vocab_size, size=n - (1 if bos else 0)).tolist()
    return ([2] if bos else []) + [int(t) for t in body]
