"""Gemma 4 MTP "assistant" drafter (``gemma4_assistant``, ``gemma4_unified_assistant``).

Follows ``shared/spec/gemma4.md`` sections 3-4.  The drafter owns no KV cache:
its Q-only layers attend to the target's producer K/V of the same layer type,
which the caller reads from the target cache.  One ``draft_step`` takes the
target's scaled embedding of the last token and a hidden state (the target's
post-norm hidden for the first step, the drafter's own ``post_projection``
output afterwards) and returns draft logits and the next hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelConfigError
from .gemma4 import FULL, SLIDING, DecoderLayer, RMSNorm, TextConfig

ASSISTANT_MODEL_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


@dataclass
class AssistantConfig:
    """Outer assistant config plus its inner text config."""

    model_type: str
    backbone_hidden_size: int
    text: TextConfig
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    raw: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "AssistantConfig":
        text_dict = dict(config.get("text_config") or {})
        if not text_dict:
            raise ModelConfigError(
                "assistant config.json has no text_config; is this a Gemma 4 assistant?"
            )
        text = TextConfig.from_dict(text_dict)
        # HF forces every drafter layer to be KV-shared (Q-only attention).
        text.num_kv_shared_layers = text.num_hidden_layers
        cfg = cls(
            model_type=config.get("model_type", "gemma4_assistant"),
            backbone_hidden_size=int(config.get("backbone_hidden_size") or text.hidden_size),
            text=text,
            use_ordered_embeddings=bool(config.get("use_ordered_embeddings", False)),
            num_centroids=int(config.get("num_centroids") or 2048),
            centroid_intermediate_top_k=int(config.get("centroid_intermediate_top_k") or 32),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            raw=dict(config),
        )
        if cfg.use_ordered_embeddings and text.vocab_size % cfg.num_centroids:
            raise ModelConfigError(
                f"vocab_size {text.vocab_size} is not divisible by num_centroids {cfg.num_centroids}"
            )
        return cfg


class MaskedEmbedding(nn.Module):
    """Centroid head: score only the tokens of the top-k centroid clusters."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.top_k = cfg.centroid_intermediate_top_k
        self.num_centroids = cfg.num_centroids
        self.centroids = nn.Linear(cfg.text.hidden_size, cfg.num_centroids, bias=False)
        self.token_ordering = mx.zeros((cfg.text.vocab_size,), dtype=mx.int32)

    def candidates(self, z: mx.array) -> mx.array:
        """Token ids ``[B, S, top_k * V/C]`` of the selected clusters."""
        c = self.centroids(z)
        top = mx.argpartition(-c, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        table = self.token_ordering.reshape(self.num_centroids, -1)
        return table[top].reshape(*z.shape[:-1], -1)


class Drafter(nn.Module):
    """``Gemma4AssistantForCausalLM``: pre-projection, Q-only layers, norm, heads."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.config = cfg
        self.args = cfg.text
        self.model_type = cfg.model_type
        t = cfg.text
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, cfg.backbone_hidden_size, bias=False)
        self.model = _DrafterBody(t)
        for layer in self.model.layers:
            layer.self_attn.rope.build_tables()  # the compiled step's RoPE (see _compiled)
        if cfg.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(cfg)
        # The layer types whose K/V the body reads, in the order the compiled step takes them.
        self._kv_types = sorted(set(cfg.text.layer_types))
        self._steps: Dict[Tuple, Callable] = {}  # (head, query shape) -> compiled step

    @property
    def layer_types(self):
        return self.args.layer_types

    def draft_step(
        self,
        token_embedding: mx.array,
        hidden: mx.array,
        shared_kv: Dict[str, Tuple[mx.array, mx.array]],
        position: int,
    ) -> Tuple[mx.array, mx.array]:
        """One drafting step at query ``position``.

        ``token_embedding`` is the *target's* scaled embedding ``[B, 1, Hb]``;
        ``shared_kv`` maps layer type to the target producer's committed
        ``(K, V)`` (oldest first).  Returns logits ``[B, 1, V]`` (no soft-cap;
        with the centroid head, tokens outside the selected clusters get
        ``-inf``) and the next hidden ``[B, 1, Hb]``.
        """
        return self._run("logits", token_embedding, hidden, shared_kv, position)

    def greedy_step(
        self, token_embedding, hidden, shared_kv, position
    ) -> Tuple[mx.array, mx.array]:
        """``draft_step`` followed by argmax, without a full-vocabulary logit row.

        Returns the draft token ids ``[B, 1]`` and the next hidden ``[B, 1, Hb]``.
        """
        return self._run("greedy_token", token_embedding, hidden, shared_kv, position)

    def hidden(self, token_embedding, hidden, shared_kv, position) -> mx.array:
        """Final-norm output of the drafter body (before the heads)."""
        return self._run("hidden", token_embedding, hidden, shared_kv, position)

    def _run(self, head: str, token_embedding, hidden, shared_kv, position):
        """One step through ``head``: "hidden" returns the body's final-norm output;
        "logits" or "greedy_token" return that head's output and the next hidden."""
        window = self.args.sliding_window
        kv = []
        for layer_type in self._kv_types:
            keys, values = shared_kv[layer_type]
            if layer_type == SLIDING:
                # HF's flipped bidirectional window: the last W+1 supplied entries.
                keys, values = keys[..., -(window + 1) :, :], values[..., -(window + 1) :, :]
            kv += [keys, values]
        body = self._compiled("body", token_embedding.shape[:2])
        z = body(token_embedding, hidden, mx.array(position, dtype=mx.int32), *kv)
        if head == "hidden":
            return z
        out = self._compiled(head, token_embedding.shape[:2])(z)
        return out, self.post_projection(z)

    def _compiled(self, part: str, query_shape: Tuple[int, ...]) -> Callable:
        """``_body`` (``part`` "body") or a head (the method of that name), compiled for
        one query shape.

        The drafter runs several small steps per round (and one per shadow probe), and
        on small layers their cost is mostly per-operation overhead: fused, a step costs
        about half.  The body is ``shapeless``, so one trace serves every KV length (the
        reshapes inside are fixed by the query shape, hence one trace per query shape);
        the heads' shapes are fixed by it.  ``inputs`` makes them read the current
        weights, not those of their first call.
        """
        key = (part, *query_shape)
        if key not in self._steps:
            fn = self._body if part == "body" else getattr(self, part)
            self._steps[key] = mx.compile(fn, inputs=self.state, shapeless=part == "body")
        return self._steps[key]

    def _body(self, token_embedding, hidden, position, *kv) -> mx.array:
        """The body's final-norm output; ``kv``: K/V pairs ordered as ``_kv_types``."""
        shared = dict(zip(self._kv_types, zip(kv[0::2], kv[1::2])))
        x = self.pre_projection(mx.concatenate([token_embedding, hidden], axis=-1))
        for layer in self.model.layers:
            x, _ = layer(x, position, shared_kv=shared[layer.self_attn.layer_type], masked=False)
        return self.model.norm(x)

    def greedy_token(self, z: mx.array) -> mx.array:
        """Argmax of ``logits(z)`` without materialising the full vocabulary row."""
        emb = self.model.embed_tokens
        if not self.config.use_ordered_embeddings:
            return mx.argmax(emb.as_linear(z), axis=-1)
        ids = self.masked_embedding.candidates(z)
        sel = (emb(ids) @ z[..., None]).squeeze(-1)
        return mx.take_along_axis(ids, mx.argmax(sel, axis=-1, keepdims=True), axis=-1).squeeze(-1)

    def logits(self, z: mx.array) -> mx.array:
        emb = self.model.embed_tokens
        if not self.config.use_ordered_embeddings:
            return emb.as_linear(z)
        ids = self.masked_embedding.candidates(z)
        sel = (emb(ids) @ z[..., None]).squeeze(-1)
        full = mx.full((*z.shape[:-1], self.args.vocab_size), -mx.inf, dtype=sel.dtype)
        return mx.put_along_axis(full, ids, sel, axis=-1)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Drop the tied ``lm_head`` copy and rotary buffers; integer ids stay integers."""
        out = {}
        for key, value in weights.items():
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if "rotary_emb" in key:
                continue
            if key.endswith("masked_embedding.token_ordering"):
                value = value.astype(mx.int32)
            out[key] = value
        return out

    @staticmethod
    def quant_predicate(path: str, module: nn.Module):
        """Quantize projections, MLPs and the tied table; never the ids or the tiny centroid table."""
        if "centroids" in path:
            return False
        return hasattr(module, "to_quantized")


class _DrafterBody(nn.Module):
    """The assistant's inner text model (its own table, layers, norm; no PLE)."""

    def __init__(self, t: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = [DecoderLayer(t, i) for i in range(t.num_hidden_layers)]
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)


def drafter_kv_shapes(drafter: Drafter) -> Dict[str, Tuple[int, int]]:
    """Per layer type used by the drafter: (KV heads, head dim) it expects."""
    t = drafter.args
    return {lt: (t.kv_heads_of(lt), t.head_dim_of(lt)) for lt in set(t.layer_types)}


__all__ = [
    "ASSISTANT_MODEL_TYPES",
    "AssistantConfig",
    "Drafter",
    "drafter_kv_shapes",
    "FULL",
    "SLIDING",
]
