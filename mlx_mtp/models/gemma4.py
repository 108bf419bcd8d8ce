"""Gemma 4 text decoder (E2B, E4B, 26B-A4B, 31B, 12B unified) in MLX.

Follows ``shared/spec/gemma4.md`` sections 1-2.  Weight names are the HF
names under ``model.``; ``sanitize`` only renames or drops (and splits the
fused expert projection the way mlx-lm stores it).  The KV cache lives
outside the model (``make_cache``).  ``forward`` optionally returns what the
MTP drafter needs from the target as an explicit value: the post-final-norm
hidden states and the K/V each producer layer returned in this forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, SlidingKVCache
from ..errors import ModelConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
TARGET_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
_MULTIMODAL_PREFIXES = (
    "vision_tower",
    "multi_modal_projector",
    "audio_tower",
    "embed_audio",
    "embed_vision",
    "vision_embedder",
)


_UNIFIED_DEFAULTS = {
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 0,
    "sliding_window": 1024,
    "max_position_embeddings": 262144,
}


@dataclass
class TextConfig:
    """Gemma 4 text config with HF transformers' defaults (not mlx-lm's)."""

    model_type: str = "gemma4_text"
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    attention_k_eq_v: bool = False
    rms_norm_eps: float = 1e-6
    rope_parameters: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    sliding_window: int = 512
    layer_types: List[str] = field(default_factory=list)
    final_logit_softcapping: Optional[float] = None
    hidden_size_per_layer_input: int = 256
    vocab_size_per_layer_input: int = 262144
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    hidden_activation: str = "gelu_pytorch_tanh"
    per_layer_config: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "TextConfig":
        """Build from a config.json dict (a text config or a multimodal wrapper)."""
        text = dict(config.get("text_config") or config)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in text.items() if k in known and v is not None}
        if "unified" in str(text.get("model_type") or config.get("model_type", "")):
            # gemma4_unified_text has no PLE/MoE fields and other defaults (HF 5.23).
            values = {**_UNIFIED_DEFAULTS, **values}
        cfg = cls(**values)
        cfg._finalize()
        return cfg

    def _finalize(self) -> None:
        if not self.layer_types:
            pattern = [SLIDING] * 5 + [FULL]
            self.layer_types = [pattern[i % 6] for i in range(self.num_hidden_layers)]
            self.layer_types[-1] = FULL
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelConfigError(
                f"config.json lists {len(self.layer_types)} layer_types for "
                f"{self.num_hidden_layers} layers; fix layer_types or num_hidden_layers"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ModelConfigError(f"unsupported layer type(s) {bad} in config.json")
        # transformers 5.23 writes global_head_dim as per-layer head_dim overrides.
        for idx, override in (self.per_layer_config or {}).items():
            if self.layer_types[int(idx)] != FULL:
                continue
            if "head_dim" in override:
                self.global_head_dim = int(override["head_dim"])
            if "num_key_value_heads" in override:
                self.num_global_key_value_heads = int(override["num_key_value_heads"])
        if not self.rope_parameters:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                FULL: {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1e6,
                },
            }
        if self.enable_moe_block and not (
            self.num_experts and self.top_k_experts and self.moe_intermediate_size
        ):
            raise ModelConfigError(
                "enable_moe_block is set but num_experts/top_k_experts/moe_intermediate_size are missing"
            )

    # -- derived layout -------------------------------------------------
    @property
    def first_shared(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def head_dim_of(self, layer_type: str) -> int:
        return self.global_head_dim if layer_type == FULL else self.head_dim

    def kv_heads_of(self, layer_type: str) -> int:
        if layer_type == FULL and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def producer(self, layer_type: str) -> Optional[int]:
        """Index of the last KV-owning layer of ``layer_type`` (what the drafter reads)."""
        owners = [i for i in range(self.first_shared) if self.layer_types[i] == layer_type]
        return owners[-1] if owners else None

    @property
    def producers(self) -> Dict[str, int]:
        return {t: self.producer(t) for t in (SLIDING, FULL) if self.producer(t) is not None}


@dataclass
class TargetOutput:
    """What one target forward hands to the caller (and to the drafter)."""

    logits: mx.array
    hidden: Optional[mx.array] = None  # post-final-norm hidden states [B, S, H]
    shared_kv: Optional[Dict[str, Tuple[mx.array, mx.array]]] = None


class Rope:
    """A layer type's RoPE (rotate-half), ``rope(x, offset)`` on ``[B, H, S, D]``.

    An ``int`` offset runs ``mx.fast.rope``.  An array offset (a scalar position, one
    query) takes a table path built from plain ops, which ``mx.compile(shapeless=True)``
    can trace once for every KV length (``mx.fast.rope`` with an array offset cannot):
    the compiled drafter step uses it.
    """

    def __init__(self, params: Dict[str, Any], head_dim: int):
        rope_type = params.get("rope_type", "default")
        base = float(params.get("rope_theta", 10000.0))
        factor = float(params.get("factor", 1.0) or 1.0)
        if rope_type not in ("default", "proportional", "linear"):
            raise ModelConfigError(
                f"unsupported rope_type {rope_type!r} (supported: default, proportional)"
            )
        partial = float(params.get("partial_rotary_factor", 1.0))
        self.head_dim, self.base, self.scale, self.freqs = head_dim, base, 1.0 / factor, None
        if rope_type == "proportional":
            # Frequencies use the full head dim; pairs beyond the rotated part get angle 0.
            rotated = 2 * int(partial * head_dim / 2)
            exps = mx.arange(0, rotated, 2, dtype=mx.float32) / head_dim
            inf = mx.full(((head_dim - rotated) // 2,), mx.inf)
            self.freqs = mx.concatenate([factor * (base**exps), inf])
            self.dims, self.base, self.scale = head_dim, None, 1.0
        else:
            self.dims = int(head_dim * partial)
        self._tables: Optional[Tuple[mx.array, mx.array]] = None  # see build_tables

    def __call__(self, x: mx.array, offset: Union[int, mx.array]) -> mx.array:
        if isinstance(offset, int):
            return mx.fast.rope(
                x,
                self.dims,
                traditional=False,
                base=self.base,
                scale=self.scale,
                offset=offset,
                freqs=self.freqs,
            )
        if self._tables is None:
            raise RuntimeError("Rope.build_tables() must run before an array offset is used")
        inv_freq, rotate_half = self._tables
        angle = offset.astype(mx.float32) * inv_freq
        out = x * mx.cos(angle) + (x @ rotate_half.astype(x.dtype)) * mx.sin(angle)
        return out.astype(x.dtype)

    def build_tables(self) -> None:
        """Per-dim inverse frequencies (0 past the rotated dims) and the rotate-half matrix
        of the array path: only layers that run it (the drafter's) hold them, built
        outside any compiled trace."""
        half, d = self.dims // 2, self.head_dim
        if self.freqs is not None:
            inv = 1.0 / self.freqs[:half]
        else:
            inv = self.scale / (
                self.base ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims)
            )
        rot = [[0.0] * d for _ in range(d)]
        for j in range(half):  # out[j] = -x[j + half], out[j + half] = x[j]
            rot[j + half][j], rot[j][j + half] = -1.0, 1.0
        self._tables = (mx.concatenate([inv, inv, mx.zeros((d - self.dims,))]), mx.array(rot))
        mx.eval(self._tables)


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: ``x / rms(x) * w`` (no ``1 + w``); ``with_scale=False`` drops ``w``."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self["weight"] if "weight" in self else None, self.eps)


def gelu_tanh(x: mx.array) -> mx.array:
    return nn.gelu_approx(x)


def sliding_mask(q_len: int, k_len: int, offset: int, window: int) -> mx.array:
    """Boolean mask for ``q_len`` queries starting at ``offset`` over the last ``k_len`` keys."""
    q_pos = offset + mx.arange(q_len)
    k_pos = offset + q_len - k_len + mx.arange(k_len)
    return (k_pos[None] <= q_pos[:, None]) & (k_pos[None] > q_pos[:, None] - window)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, owns_kv: bool):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        self.is_full = self.layer_type == FULL
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim_of(self.layer_type)
        self.n_kv = cfg.kv_heads_of(self.layer_type)
        self.window = cfg.sliding_window
        self.owns_kv = owns_kv
        self.k_eq_v = self.is_full and cfg.attention_k_eq_v
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        if owns_kv:
            self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)
        self.rope = Rope(cfg.rope_parameters.get(self.layer_type, {}), d)

    def project_kv(self, x: mx.array, offset: int) -> Tuple[mx.array, mx.array]:
        b, s, _ = x.shape
        k_raw = self.k_proj(x).reshape(b, s, self.n_kv, self.head_dim)
        v_raw = k_raw if self.k_eq_v else self.v_proj(x).reshape(b, s, self.n_kv, self.head_dim)
        k = self.rope(self.k_norm(k_raw).transpose(0, 2, 1, 3), offset)
        v = self.v_norm(v_raw).transpose(0, 2, 1, 3)
        return k, v

    def __call__(
        self,
        x: mx.array,
        offset: int,
        cache=None,
        shared_kv: Optional[Tuple[mx.array, mx.array]] = None,
        masked: bool = True,
    ) -> Tuple[mx.array, Tuple[mx.array, mx.array]]:
        """Returns the attention output and the K/V it attended to.

        ``masked=False`` (the drafter) lets every query see every supplied key.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.n_heads, self.head_dim)
        q = self.rope(self.q_norm(q).transpose(0, 2, 1, 3), offset)
        if shared_kv is not None:
            keys, values = shared_kv
        else:
            keys, values = self.project_kv(x, offset)
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
        if masked:
            out = attend(q, keys, values, offset, None if self.is_full else self.window)
        else:
            out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0)
        out = out.transpose(0, 2, 1, 3).reshape(b, s, -1)
        return self.o_proj(out), (keys, values)


def attend(
    q: mx.array, keys: mx.array, values: mx.array, offset: int, window: Optional[int]
) -> mx.array:
    """Scaled-dot-product attention with scale 1.0 (q and k are RMS-normalised).

    ``keys`` are the most recent ``k_len`` positions ending at the last query.
    """
    s, k_len = q.shape[2], keys.shape[2]
    if window is not None and k_len > window:
        mask = sliding_mask(s, k_len, offset, window)
    elif s > 1:  # every key is within the window: plain causal
        mask = "causal"
    else:
        mask = None
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax over all experts, top-k, renormalise, then per-expert scale (fp32 weights)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps
        self.root = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = mx.ones((cfg.hidden_size,))
        self.per_expert_scale = mx.ones((cfg.num_experts,))

    def __call__(self, x: mx.array) -> Tuple[mx.array, mx.array]:
        z = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root
        probs = mx.softmax(self.proj(z).astype(mx.float32), axis=-1)
        idx = mx.stop_gradient(
            mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        )
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return idx, w * self.per_expert_scale[idx].astype(mx.float32)


class _GeGLU(nn.Module):
    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return gelu_tanh(gate) * x


class Experts(nn.Module):
    """Routed experts through MLX gather kernels (quantizable as SwitchLinear)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        from mlx_lm.models.switch_layers import SwitchGLU  # imports all of mlx_lm: only for MoE

        self.switch_glu = SwitchGLU(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
            activation=_GeGLU(),
            bias=False,
        )

    def __call__(self, x: mx.array, idx: mx.array, w: mx.array) -> mx.array:
        y = self.switch_glu(x, idx)
        return (y.astype(mx.float32) * w[..., None]).sum(axis=-2).astype(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, idx: int):
        super().__init__()
        h = cfg.hidden_size
        shared = idx >= cfg.first_shared
        self.self_attn = Attention(cfg, idx, owns_kv=not shared)
        wide = 2 if (cfg.use_double_wide_mlp and shared and cfg.num_kv_shared_layers > 0) else 1
        self.mlp = MLP(h, cfg.intermediate_size * wide)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.ple = cfg.hidden_size_per_layer_input > 0
        if self.ple:
            p = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(h, p, bias=False)
            self.per_layer_projection = nn.Linear(p, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x, offset, cache=None, shared_kv=None, per_layer_input=None, masked=True):
        a, kv = self.self_attn(self.input_layernorm(x), offset, cache, shared_kv, masked)
        x = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            idx, w = self.router(x)
            e = self.experts(self.pre_feedforward_layernorm_2(x), idx, w)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(e)
        x = x + self.post_feedforward_layernorm(m)
        if self.ple:
            g = gelu_tanh(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar.astype(x.dtype), kv


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        p = cfg.hidden_size_per_layer_input
        if p > 0:
            n = cfg.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, n * p)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n * p, bias=False)
            self.per_layer_projection_norm = RMSNorm(p, cfg.rms_norm_eps)

    def embed(self, ids: mx.array) -> mx.array:
        """Scaled token embedding ``E[ids] * bf16(sqrt(H))`` (also the drafter's input)."""
        x = self.embed_tokens(ids)
        # HF rounds the scale to the weight dtype (bf16(sqrt(H)) for bf16 checkpoints).
        return x * mx.array(math.sqrt(self.cfg.hidden_size), dtype=x.dtype)

    def per_layer_inputs(self, ids: mx.array, x0: mx.array) -> mx.array:
        cfg = self.cfg
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        t = self.embed_tokens_per_layer(ids)
        t = t * mx.array(math.sqrt(p), dtype=t.dtype)
        c = self.per_layer_model_projection(x0) * (cfg.hidden_size**-0.5)
        c = self.per_layer_projection_norm(c.reshape(*x0.shape[:-1], n, p))
        return (c + t.reshape(*ids.shape, n, p).astype(c.dtype)) * (2**-0.5)

    def __call__(self, ids: mx.array, cache=None, want_kv: bool = False):
        cfg = self.cfg
        x = self.embed(ids)
        ple = self.per_layer_inputs(ids, x) if cfg.hidden_size_per_layer_input > 0 else None
        offset = cache[0].offset if cache else 0
        producer_kv: Dict[int, Tuple[mx.array, mx.array]] = {}
        src = _kv_sources(cfg)
        for i, layer in enumerate(self.layers):
            shared = producer_kv[src[i]] if src[i] != i else None
            layer_cache = cache[i] if (cache is not None and src[i] == i) else None
            pli = ple[..., i, :] if ple is not None else None
            x, kv = layer(x, offset, layer_cache, shared, pli)
            if src[i] == i:
                producer_kv[i] = kv
        shared_kv = {t: producer_kv[i] for t, i in cfg.producers.items()} if want_kv else None
        return self.norm(x), shared_kv


def _kv_sources(cfg: TextConfig) -> List[int]:
    """For each layer, the layer whose K/V it uses (itself unless KV-shared)."""
    return [
        i if i < cfg.first_shared else cfg.producer(cfg.layer_types[i])
        for i in range(cfg.num_hidden_layers)
    ]


class Model(nn.Module):
    """Gemma 4 causal LM: ``model(ids[None])`` -> logits ``[1, S, V]``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.args = cfg
        self.model_type = cfg.model_type
        self.model = TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.forward(inputs, cache).logits

    def forward(
        self,
        inputs: mx.array,
        cache=None,
        return_hidden: bool = False,
        last_only: bool = False,
    ) -> TargetOutput:
        """Run the target; with ``return_hidden`` also return post-norm hidden and producer K/V.

        ``last_only`` computes logits for the final position only (prefill).
        """
        h, shared_kv = self.model(inputs, cache, want_kv=return_hidden)
        logits = self.logits(h[:, -1:] if last_only else h)
        return TargetOutput(logits, h if return_hidden else None, shared_kv)

    def logits(self, h: mx.array) -> mx.array:
        out = (
            self.model.embed_tokens.as_linear(h)
            if self.args.tie_word_embeddings
            else self.lm_head(h)
        )
        cap = self.args.final_logit_softcapping
        return mx.tanh(out / cap) * cap if cap else out

    def embed(self, ids: mx.array) -> mx.array:
        return self.model.embed(ids)

    def make_cache(self, slack: int = 64) -> list:
        """One cache per KV-owning layer, in layer order (consumers own none)."""
        cfg = self.args
        return [
            KVCache() if cfg.layer_types[i] == FULL else SlidingKVCache(cfg.sliding_window, slack)
            for i in range(cfg.first_shared)
        ]

    @property
    def layers(self):
        return self.model.layers

    @staticmethod
    def sanitize_key(key: str) -> Optional[str]:
        """Map a checkpoint key to our name, or ``None`` to drop it."""
        for prefix in ("model.language_model.", "language_model.model.", "language_model."):
            if key.startswith(prefix):
                key = "model." + key[len(prefix) :]
                break
        else:
            if key.startswith("model.") and key.split(".")[1] in _MULTIMODAL_PREFIXES:
                return None
        if key.split(".")[0] in _MULTIMODAL_PREFIXES or "rotary_emb" in key:
            return None
        if any(s in key for s in ("input_max", "input_min", "output_max", "output_min")):
            return None
        return key

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """HF / mlx-community names -> ours; drop towers and unused consumer K/V weights."""
        out = {}
        first_shared = self.args.first_shared
        for key, value in weights.items():
            key = self.sanitize_key(key)
            if key is None:
                continue
            if _is_consumer_kv(key, first_shared):
                continue
            if key.endswith(".experts.gate_up_proj"):
                base = key[: -len(".gate_up_proj")]
                gate, up = mx.split(value, 2, axis=-2)
                out[f"{base}.switch_glu.gate_proj.weight"] = gate
                out[f"{base}.switch_glu.up_proj.weight"] = up
                continue
            if key.endswith(".experts.down_proj"):
                out[key[: -len(".down_proj")] + ".switch_glu.down_proj.weight"] = value
                continue
            out[key] = value
        return out

    @staticmethod
    def quant_predicate(path: str, module: nn.Module):
        """Router projections at 8 bits; everything quantizable else at the default."""
        if path.endswith("router.proj"):
            return {"group_size": 64, "bits": 8}
        return hasattr(module, "to_quantized")


def _is_consumer_kv(key: str, first_shared: int) -> bool:
    if not any(s in key for s in (".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.k_norm")):
        return False
    parts = key.split(".")
    if "layers" not in parts:
        return False
    return int(parts[parts.index("layers") + 1]) >= first_shared
