"""Token generation: plain decoding and MTP speculative decoding.

The speculative round (``mtp_round``) is the heart of mlx-mtp: draft k
tokens with the assistant, verify ``[last, d1..dk]`` in one target forward,
accept, roll the caches back, and hand the next round its seed.  Everything
inside a round stays lazy until one host synchronisation at the end.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

import mlx.core as mx

from .cache import trim_cache
from .controller import AdaptiveController, Controller, FixedController, RoundTiming
from .errors import DrafterMismatchError, GenerationError
from .models.gemma4 import SLIDING, Model
from .models.gemma4_assistant import Drafter
from .sampling import Sampler, sample_from

DEFAULT_NUM_DRAFT_TOKENS = "auto"
# A seeded sampled run must not depend on timings, so "auto" becomes this fixed k.
SEEDED_NUM_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16


@dataclass
class GenerationStats:
    """Counts and timings of one generation run."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    target_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    drafted_by_position: List[int] = field(default_factory=list)
    accepted_by_position: List[int] = field(default_factory=list)
    rounds: int = 0
    draft_time: float = 0.0  # from timed rounds, seconds
    target_time: float = 0.0
    timed_draft_steps: int = 0
    timed_target_forwards: int = 0
    k_counts: Dict[int, int] = field(default_factory=dict)
    shadow_probes: int = 0  # plain steps that also scored a drafter step (auto, at k = 0)
    shadow_accepted: float = 0.0  # expected accepted drafts among them
    mtp: bool = False
    peak_memory_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0

    @property
    def decode_forwards(self) -> int:
        """Target forwards after the prompt (each emits 1..k+1 tokens)."""
        return self.rounds

    @property
    def mean_tokens_per_forward(self) -> float:
        """Generated tokens per decoding target forward (the prefill's token excluded)."""
        return (self.generation_tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def acceptance_by_position(self) -> List[float]:
        return [
            a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)
        ]

    @property
    def draft_step_ms(self) -> float:
        return 1e3 * self.draft_time / self.timed_draft_steps if self.timed_draft_steps else 0.0

    @property
    def target_forward_ms(self) -> float:
        return (
            1e3 * self.target_time / self.timed_target_forwards
            if self.timed_target_forwards
            else 0.0
        )

    def record_round(self, k: int, n: int) -> None:
        self.rounds += 1
        self.k_counts[k] = self.k_counts.get(k, 0) + 1
        self.drafted_tokens += k
        self.accepted_tokens += n
        while len(self.drafted_by_position) < k:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(k):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < n)


@dataclass
class RoundState:
    """What a round starts from: the last token (not yet in the cache) and the
    target's post-norm hidden of the position before it."""

    token: mx.array  # [1] int32
    hidden: mx.array  # [1, 1, H]


def check_pair(target, drafter, target_tokenizer=None, drafter_tokenizer=None) -> None:
    """Refuse a drafter that cannot be paired with ``target``; the message names the mismatch."""
    if not isinstance(drafter, Drafter):
        kind = getattr(drafter, "model_type", type(drafter).__name__)
        raise DrafterMismatchError(
            f"the draft model is a {kind} model, not a Gemma 4 assistant drafter "
            "(model_type gemma4_assistant); pass the matching '-assistant' checkpoint as --draft-model"
        )
    if not isinstance(target, Model):
        raise DrafterMismatchError(
            f"the target is a {getattr(target, 'model_type', type(target).__name__)} model; "
            "pass a Gemma 4 target as --model and the assistant as --draft-model"
        )
    t, d = target.args, drafter.args
    problems = []
    if drafter.config.backbone_hidden_size != t.hidden_size:
        problems.append(
            f"drafter backbone_hidden_size {drafter.config.backbone_hidden_size} != target hidden_size {t.hidden_size}"
        )
    if d.vocab_size != t.vocab_size:
        problems.append(f"drafter vocab_size {d.vocab_size} != target vocab_size {t.vocab_size}")
    for lt in sorted(set(d.layer_types)):
        if t.producer(lt) is None:
            problems.append(f"target has no KV-owning {lt} layer for the drafter to read")
            continue
        if d.kv_heads_of(lt) != t.kv_heads_of(lt) or d.head_dim_of(lt) != t.head_dim_of(lt):
            problems.append(
                f"{lt}: drafter expects {d.kv_heads_of(lt)} KV heads x head_dim {d.head_dim_of(lt)}, "
                f"target has {t.kv_heads_of(lt)} x {t.head_dim_of(lt)}"
            )
        if d.num_attention_heads % t.kv_heads_of(lt):
            problems.append(
                f"{lt}: {d.num_attention_heads} drafter query heads do not group over {t.kv_heads_of(lt)} KV heads"
            )
    if SLIDING in d.layer_types and d.sliding_window != t.sliding_window:
        problems.append(f"sliding_window: drafter {d.sliding_window} != target {t.sliding_window}")
    if target_tokenizer is not None and drafter_tokenizer is not None:
        if _vocab_of(target_tokenizer) != _vocab_of(drafter_tokenizer):
            problems.append("the drafter's tokenizer differs from the target's")
    if problems:
        raise DrafterMismatchError(
            "draft model does not match the target: "
            + "; ".join(problems)
            + ". Use the assistant checkpoint published for this target."
        )


def _vocab_of(tokenizer) -> Dict[str, int]:
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    return inner.get_vocab() if hasattr(inner, "get_vocab") else {}


def drafter_kv(target: Model, cache: list, skip: int = 0) -> Dict[str, Tuple[mx.array, mx.array]]:
    """The producers' committed K/V before the last ``skip`` entries, read in place from
    the target cache (no copy).

    Sliding layers hand out their last ``W + 1`` entries, the most HF's drafter sees.
    """
    cfg = target.args
    return {
        lt: cache[i].committed(cfg.sliding_window + 1 if lt == SLIDING else None, skip)
        for lt, i in cfg.producers.items()
    }


def draft(
    target: Model, drafter: Drafter, state: RoundState, kv, position: int, k: int, sampler: Sampler
) -> Tuple[mx.array, Optional[mx.array]]:
    """Draft ``k`` tokens (lazily); returns ids ``[k]`` and, when sampling, their distributions ``[k, V]``."""
    token, hidden, drafts, qs = state.token, state.hidden, [], []
    for _ in range(k):
        emb = target.embed(token[None])
        if sampler.greedy:
            token, hidden = drafter.greedy_step(emb, hidden, kv, position)
            token = token[0]
        else:
            logits, hidden = drafter.draft_step(emb, hidden, kv, position)
            q = sampler.probs(logits[0, -1])
            token = sample_from(q)[None]
            qs.append(q)
        drafts.append(token)
    if not drafts:
        return mx.zeros((0,), dtype=mx.int32), None
    return mx.concatenate(drafts).astype(mx.int32), (mx.stack(qs) if qs else None)


def accept(
    logits: mx.array, drafts: mx.array, q: Optional[mx.array], sampler: Sampler
) -> Tuple[mx.array, mx.array, Optional[mx.array]]:
    """Number of accepted drafts, the token that follows them, and (sampling) each
    draft's probability to pass given the drafts before it passed (all lazy).

    Greedy: longest prefix where the draft equals the target's argmax, then the
    target's own token.  Sampling: exact speculative sampling (accept ``d`` with
    probability ``min(1, p(d)/q(d))``, else resample from ``norm(max(0, p - q))``;
    after k acceptances sample the bonus from ``p``).  A draft drawn from ``q`` passes
    with probability ``sum(min(p, q)) = 1 - sum(max(0, p - q))``, which the residual
    already sums: the controller learns acceptance from it (see ``Controller.observe``).
    """
    k = drafts.shape[0]
    if k == 0:
        return mx.array(0), sampler(logits[0]), None
    if sampler.greedy:
        target_tokens = mx.argmax(logits, axis=-1)
        n = mx.cumprod((drafts == target_tokens[:k]).astype(mx.int32)).sum()
        return n, mx.take(target_tokens, n), None
    p = sampler.probs(logits)  # [k+1, V]
    rows = mx.arange(k)
    p_d, q_d = p[rows, drafts], q[rows, drafts]
    ok = mx.random.uniform(shape=(k,)) * q_d < p_d
    n = mx.cumprod(ok.astype(mx.int32)).sum()
    residual = mx.maximum(p[:k] - q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    residual = residual / mx.maximum(mass, 1e-30)
    dist = mx.concatenate([residual, p[k:]], axis=0)
    return n, sample_from(mx.take(dist, n, axis=0)), mx.clip(1.0 - mass[:, 0], 0.0, 1.0)


class RoundResult(NamedTuple):
    """What one speculative round hands back: the tokens it emits (accepted drafts, then
    the target's own), how many drafts passed, the next round's state, and (sampling)
    each draft's probability to pass given the drafts before it passed."""

    tokens: List[int]
    accepted: int
    state: RoundState
    chances: Optional[List[float]] = None


def mtp_round(
    target: Model,
    drafter: Drafter,
    cache: list,
    state: RoundState,
    k: int,
    sampler: Sampler,
    timing: Optional[RoundTiming] = None,
) -> RoundResult:
    """One speculative round: emitted tokens, accepted drafts, the next state and
    (sampling) the drafts' pass probabilities.

    With ``timing`` the round synchronises once more, after drafting, to split
    drafter and target time (used on a few rounds to calibrate the controller).
    """
    position = cache[0].offset  # the last token's position: it is not in the cache yet
    t0 = time.perf_counter()
    drafts, q = draft(target, drafter, state, drafter_kv(target, cache), position, k, sampler)
    if timing is not None:
        mx.eval(drafts)
        timing.draft = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = target.forward(mx.concatenate([state.token, drafts])[None], cache, return_hidden=True)
    n_arr, nxt, chances = accept(out.logits[0], drafts, q, sampler)
    mx.eval(n_arr, nxt, drafts, chances)  # the round's one host synchronisation
    if timing is not None:
        timing.verify = time.perf_counter() - t1
    n = n_arr.item()
    trim_cache(cache, k - n)  # drop the rejected drafts' K/V from every cache
    tokens = drafts[:n].tolist() + [nxt.item()]
    state = RoundState(nxt.reshape(1).astype(mx.int32), out.hidden[:, n : n + 1])
    return RoundResult(tokens, n, state, None if chances is None else chances.tolist())


def prefill(
    target: Model, cache: list, ids: List[int], step: int, stats: GenerationStats
) -> Tuple[mx.array, mx.array]:
    """Run the prompt through the target in chunks; returns last logits and hidden.

    All but the last token only fill the caches: evaluating just the cache lets
    MLX skip the KV-sharing consumer layers and the LM head for those positions.
    """
    arr = mx.array(ids, dtype=mx.int32)
    for start in range(0, len(ids) - 1, step):
        target.forward(arr[None, start : min(start + step, len(ids) - 1)], cache)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
        stats.target_forwards += 1
    out = target.forward(arr[None, -1:], cache, return_hidden=True)
    stats.target_forwards += 1
    return out.logits[0, -1], out.hidden[:, -1:]


def _validate(prompt_ids, max_tokens, num_draft_tokens) -> None:
    if len(prompt_ids) == 0:
        raise GenerationError("the prompt is empty; give at least one token")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise GenerationError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if num_draft_tokens == "auto":
        return
    if not isinstance(num_draft_tokens, int) or not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise GenerationError(
            f"num_draft_tokens must be 'auto' or an integer in 0..{MAX_DRAFT_TOKENS}, got {num_draft_tokens!r}"
        )


# Adaptive controllers per (target, drafter) pair: what they measured (costs on this
# machine, acceptance of this pair) stays valid across requests, so only the first
# request of a pair pays for calibration.  Greedy and sampled requests share one: a
# controller per kind was tried and measured worse on sampled text the drafter cannot
# guess (its calibration then rests on the first sampled request alone).  Only the
# acceptance estimate is per mode: a request in the other mode than the last starts
# from the prior (see ``start_request``).  Entries go away with either model.
_CONTROLLERS: Dict[Tuple[int, int], AdaptiveController] = {}


def make_controller(num_draft_tokens: Union[int, str], target=None, drafter=None) -> Controller:
    """A fixed-k controller, or the pair's adaptive controller for ``"auto"``."""
    if num_draft_tokens != "auto":
        return FixedController(int(num_draft_tokens))
    if target is None or drafter is None:
        return AdaptiveController()
    key = (id(target), id(drafter))
    if key not in _CONTROLLERS:
        _CONTROLLERS[key] = AdaptiveController()
        for obj in (target, drafter):
            weakref.finalize(obj, _CONTROLLERS.pop, key, None)
    return _CONTROLLERS[key]


def generate_tokens(
    model: Model,
    prompt_ids: List[int],
    *,
    max_tokens: int,
    sampler: Sampler,
    draft_model: Optional[Drafter] = None,
    num_draft_tokens: Union[int, str] = DEFAULT_NUM_DRAFT_TOKENS,
    stop_ids: Set[int] = frozenset(),
    stats: Optional[GenerationStats] = None,
    prefill_step_size: int = 2048,
    controller: Optional[Controller] = None,
) -> Iterator[Tuple[int, bool]]:
    """Yield ``(token, from_draft)`` until ``max_tokens`` or a stop token (included).

    With ``draft_model`` every round is a speculative round whose k the
    controller picks (k = 0 is a plain step); without it, plain decoding.
    """
    _validate(prompt_ids, max_tokens, num_draft_tokens)
    stats = stats if stats is not None else GenerationStats()
    cache = model.make_cache(slack=MAX_DRAFT_TOKENS + 16)
    tic = time.perf_counter()
    logits, hidden = prefill(model, cache, prompt_ids, prefill_step_size, stats)
    token = sampler(logits).reshape(1).astype(mx.int32)
    mx.eval(token, hidden)
    stats.prompt_tokens, stats.prompt_time = len(prompt_ids), time.perf_counter() - tic
    tic = time.perf_counter()
    if draft_model is None:
        steps = _plain_steps(
            model, cache, RoundState(token, hidden), sampler, max_tokens, stop_ids, stats
        )
    else:
        controller = controller or make_controller(num_draft_tokens, model, draft_model)
        steps = _mtp_steps(
            model,
            draft_model,
            cache,
            RoundState(token, hidden),
            sampler,
            max_tokens,
            stop_ids,
            stats,
            controller,
        )
    try:
        for item in steps:
            stats.generation_tokens += 1
            stats.generation_time = time.perf_counter() - tic
            yield item
    finally:
        stats.generation_time = time.perf_counter() - tic
        stats.peak_memory_bytes = mx.get_peak_memory()


class _Burst:
    """Where a plain run stands in the controller's current burst (``PlainBurst``)."""

    def __init__(self, plan, sampler, drafter):
        self.left = plan.steps  # steps of the burst not yet queued
        self.probes = plan.probes if drafter is not None else 0
        self.depth = _probe_depth(plan, sampler)

    def next_depth(self) -> int:
        """Drafts the next queued step shadow-probes (0: none); counts the step."""
        self.left -= 1
        self.probes -= 1
        return self.depth if self.probes >= 0 else 0


def _plain_run(
    model, drafter, cache, state: RoundState, sampler, controller, limit, stop_ids, stats
):
    """Plain decoding steps for as long as the controller keeps choosing k = 0, at most
    ``limit`` tokens or up to a stop token.  Yields ``(token, False)``; returns
    ``(state, k, ran)``: the next round's state, the k the controller chose for it (0: the
    request is over) and the tokens produced.

    Steps are pipelined: the next forward is queued before this token is read.  The
    controller plans the run in bursts (``plain_burst``); at a burst's end it is told the
    plain steps' time and asked again before the burst's last token is read, so a run
    that stays at k = 0 keeps its pipeline full.

    Shadow probes: the first ``plan.probes`` steps of a burst also draft ``plan.depth``
    tokens (one when sampling) from the step's input state, in the step's lazy graph (no
    extra synchronisation), and the drafts are scored against the tokens the target then
    produces, as a round would score them: greedy, the matching prefix (a probe the run's
    end cuts short is scored on the tokens it reached); sampling, ``sum(min(p, q))``, the
    probability that speculative sampling would accept the draft.
    """
    burst = _Burst(controller.plain_burst(), sampler, drafter)
    # Plain steps are priced in steady state, the pipeline full: from one token read to the
    # next.  The first token's wait (its forward was queued only now) is the cost of
    # switching from a round, which the round's own price already carries.
    mark = last = None  # when the controller last saw the time; the last token's read
    timed = spent = 0  # steps and shadow-probe drafter steps since then
    chains: List[List] = []  # greedy probes being scored: [drafts, tokens matched so far]
    depth = burst.next_depth()
    pending = _plain_step(model, drafter, cache, state, sampler, depth, stats) + (depth,)
    k, ran = 0, 0
    while pending is not None:
        (state, shadow, depth), pending = pending, None
        ran += 1
        if ran < limit:
            if burst.left == 0:
                if mark is not None:
                    controller.observe_plain(timed, last - mark, spent)
                    mark, timed, spent = last, 0, 0
                k = controller.choose()
                if k == 0:
                    burst = _Burst(controller.plain_burst(), sampler, drafter)
            if k == 0:
                d = burst.next_depth()
                pending = _plain_step(model, drafter, cache, state, sampler, d, stats) + (d,)
        tok = state.token.item()
        last = time.perf_counter()
        if mark is None:
            mark = last
        else:
            timed, spent = timed + 1, spent + depth
        more = pending is not None and tok not in stop_ids  # plain steps follow this token
        for drafted, accepted in _score_shadows(chains, shadow, tok, more, sampler):
            stats.shadow_probes += 1
            stats.shadow_accepted += accepted
            controller.observe_shadow(drafted, accepted)
        yield tok, False
        if tok in stop_ids:
            k, pending = 0, None
    if k == 0:  # the request is over: the steps since the last burst's end
        controller.observe_plain(timed, last - mark, spent)
    return state, k, ran


def _plain_step(model, drafter, cache, state: RoundState, sampler, depth: int, stats):
    """Queue one plain step (and, with ``depth`` > 0, its shadow probe); returns the next
    state and the probe's drafts (greedy) or acceptance probability (sampling), lazily."""
    res = model.forward(state.token[None], cache, return_hidden=True)
    # The probe is built after the forward and reads the entries before the one it adds:
    # read before, the forward's cache write could not reuse the buffer in place (a probe
    # then cost about 1.5 drafter steps).
    q = _shadow_draft(model, drafter, cache, state, depth, sampler) if depth else None
    stats.target_forwards += 1
    stats.record_round(0, 0)
    logits = res.logits[0, -1]
    if depth and not sampler.greedy:
        # What ``sampler(logits)`` draws from, computed once for the token and the probe.
        p = sampler.probs(logits)
        tok, q = sample_from(p), mx.minimum(p, q).sum()  # q: the acceptance probability
    else:
        tok = sampler(logits)
    tok = tok.reshape(1).astype(mx.int32)
    mx.async_eval(tok, *([q] if depth else []))
    return RoundState(tok, res.hidden), q


def _score_shadows(chains: List[List], shadow, tok: int, more: bool, sampler):
    """Score shadow probes against the token just produced; returns ``(drafted, accepted)``
    of each probe that is complete.  ``shadow`` is this step's probe (or None); ``more``:
    whether plain steps follow (else open greedy probes are cut here)."""
    scored = []
    if shadow is not None and not sampler.greedy:
        scored.append((1, shadow.item()))
    elif shadow is not None:
        chains.append([shadow.tolist(), 0])
    for chain in list(chains):
        drafts, n = chain
        if drafts[n] == tok and n + 1 < len(drafts) and more:
            chain[1] = n + 1
            continue
        chains.remove(chain)
        passed = n + int(drafts[n] == tok)
        # Drafted: up to the first miss, or all that could be compared.
        scored.append((len(drafts) if passed < n + 1 else n + 1, passed))
    return scored


def _probe_depth(plan, sampler) -> int:
    """Drafts per shadow probe: the plan's when greedy; one when sampling (only the first
    draft's acceptance probability is known without drawing the drafts)."""
    return plan.depth if sampler.greedy else 1


def _shadow_draft(model, drafter, cache, state: RoundState, depth: int, sampler) -> mx.array:
    """A shadow probe's drafts from ``state`` (greedy: ``depth`` ids) or, sampling, the
    drafter's distribution for the next token; queued after the forward that adds
    ``state.token`` to the cache, it reads the entries before that one."""
    kv, position = drafter_kv(model, cache, skip=1), cache[0].offset - 1
    if sampler.greedy:
        return draft(model, drafter, state, kv, position, depth, sampler)[0]
    logits, _ = drafter.draft_step(model.embed(state.token[None]), state.hidden, kv, position)
    return sampler.probs(logits[0, -1])


def _plain_steps(
    model, cache, state, sampler, max_tokens, stop_ids, stats
) -> Iterator[Tuple[int, bool]]:
    """Plain decoding: the prefill's token, then pipelined one-token steps."""
    first = state.token.item()
    yield first, False
    if first in stop_ids or max_tokens == 1:
        return
    plain = FixedController(0)  # one burst to the end: no decisions, no shadow probes
    yield from _plain_run(
        model, None, cache, state, sampler, plain, max_tokens - 1, stop_ids, stats
    )


def _mtp_steps(
    model, drafter, cache, state, sampler, max_tokens, stop_ids, stats, controller
) -> Iterator[Tuple[int, bool]]:
    """Speculative decoding: rounds of draft + verify (or plain bursts when k = 0)."""
    stats.mtp = True
    controller.start_request(sampled=not sampler.greedy)
    first = state.token.item()
    yield first, False
    if first in stop_ids:
        return
    produced, k = 1, None
    while produced < max_tokens:
        remaining = max_tokens - produced
        # A plain run that ends because drafting pays has already asked the controller.
        k = min(controller.choose() if k is None else k, remaining - 1)
        if k <= 0:
            run = _plain_run(
                model, drafter, cache, state, sampler, controller, remaining, stop_ids, stats
            )
            state, k, ran = yield from run
            produced += ran
            if k == 0:
                return
            continue
        timing = RoundTiming() if controller.wants_timing() else None
        tic = time.perf_counter()
        tokens, n, state, chances = mtp_round(model, drafter, cache, state, k, sampler, timing)
        stats.target_forwards += 1
        stats.record_round(k, n)
        controller.observe(k, n, chances)
        for i, tok in enumerate(tokens):
            produced += 1
            yield tok, i < n
            if tok in stop_ids or produced >= max_tokens:
                return
        # Wall time of the whole round, consumer included, as for plain bursts.
        elapsed = time.perf_counter() - tic
        controller.observe_round_time(k, elapsed)
        if timing is not None:
            timing.total = elapsed
            controller.observe_cost(k, timing)
            stats.draft_time += timing.draft
            stats.target_time += timing.verify
            stats.timed_draft_steps += k
            stats.timed_target_forwards += 1
        k = None
