"""Samplers as explicit distributions.

Exact speculative sampling needs the *distribution* the target samples from
(and the same transform applied to the drafter), not only a sampled token, so
a ``Sampler`` turns logits into probabilities (temperature, top-k, top-p) and
draws from them.  ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .errors import GenerationError


@dataclass(frozen=True)
class Sampler:
    """Token sampler: ``temperature`` 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: mx.array) -> mx.array:
        """Probabilities (float32, last axis) after temperature, top-k and top-p."""
        logits = logits.astype(mx.float32) / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -self.top_k][..., None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        probs = mx.softmax(logits, axis=-1)
        if self.top_p < 1.0:
            probs = _top_p(probs, self.top_p)
        return probs

    def __call__(self, logits: mx.array) -> mx.array:
        """Sample token ids from ``logits`` (last axis)."""
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        return sample_from(self.probs(logits))


def _top_p(probs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    order = mx.argsort(-probs, axis=-1)
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    before = mx.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each token
    keep_sorted = before < top_p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    kept = mx.where(keep, probs, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


def sample_from(probs: mx.array) -> mx.array:
    """Draw one index per row of a probability tensor (zeros never drawn)."""
    return mx.random.categorical(mx.log(probs), axis=-1)


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    """Raise ``GenerationError`` for values a sampler cannot use."""
    if (
        not (isinstance(temperature, (int, float)) and math.isfinite(temperature))
        or temperature < 0
    ):
        raise GenerationError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    if temperature > 100:
        raise GenerationError(f"temperature {temperature} is absurd; use a value between 0 and 100")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise GenerationError(f"top-p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top-k must be an integer >= 0 (0 = off), got {top_k}")


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """mlx-lm-style constructor for a ``Sampler``."""
    return Sampler(float(temp), float(top_p), int(top_k))


GREEDY = Sampler()


def resolve_sampler(sampler: Optional[Sampler]) -> Sampler:
    if sampler is None:
        return GREEDY
    if not isinstance(sampler, Sampler):
        raise GenerationError(
            "sampler must be an mlx_mtp.Sampler (use mlx_mtp.make_sampler(temp, top_p, top_k)); "
            "exact speculative sampling needs the sampling distribution, not an opaque callable"
        )
    return sampler
