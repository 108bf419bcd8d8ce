"""MTP speculative decoding: lossless greedy, exact acceptance accounting, rollback, stops."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_mtp.controller import PlainBurst
from mlx_mtp.errors import DrafterMismatchError, GenerationError
from mlx_mtp.loading import load
from mlx_mtp.models.gemma4_assistant import AssistantConfig, Drafter
from mlx_mtp.sampling import Sampler
from mlx_mtp.speculative import (
    FixedController,
    GenerationStats,
    RoundState,
    check_pair,
    draft,
    drafter_kv,
    generate_tokens,
    mtp_round,
    prefill,
)
from tiny_mlx import drafter_config, make_pair, target_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
TARGET, ASSISTANT = SHARED / "tiny-gemma4-code", SHARED / "tiny-gemma4-code-assistant"
CODE_PROMPT = """import unittest
from test import support


class DecodeTests(unittest.TestCase):
    def test_float(self):
        rval = self.loads('1', parse_int=float)
"""

needs_shared = pytest.mark.skipif(not TARGET.exists(), reason="../shared/models is not present")


def run(model, prompt, n, drafter=None, k=4, sampler=Sampler(), stop_ids=frozenset()):
    stats = GenerationStats()
    out = list(
        generate_tokens(
            model,
            prompt,
            max_tokens=n,
            sampler=sampler,
            draft_model=drafter,
            num_draft_tokens=k,
            stop_ids=stop_ids,
            stats=stats,
        )
    )
    return [t for t, _ in out], [f for _, f in out], stats


@pytest.fixture(scope="module")
def shared_pair():
    if not TARGET.exists():
        pytest.skip("../shared/models is not present")
    model, tok = load(str(TARGET))
    drafter, _ = load(str(ASSISTANT))
    return model, drafter, tok


def _quantize(model, bits=4):
    nn.quantize(
        model,
        group_size=64,
        bits=bits,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0,
    )
    return model


@needs_shared
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "4bit"])
def test_shared_pair_lossless_every_k(dtype):
    """Greedy MTP == plain greedy for k = 1..8, crossing the 128-token window 3+ times."""
    # 4-bit runs with float32 activations: MLX's CPU backend is 5-9x slower with bf16 ones.
    model, tok = load(str(TARGET), dtype="float32" if dtype == "4bit" else dtype)
    drafter, _ = load(str(ASSISTANT), dtype=dtype if dtype != "4bit" else "float32")
    if dtype == "4bit":
        _quantize(model)
        _quantize(drafter)
    prompt = tok.encode(CODE_PROMPT)
    n = 340  # prompt ~60 + 340 tokens: past 3 windows of 128
    plain, _, _ = run(model, prompt, n)
    for k in range(1, 9):
        got, from_draft, stats = run(model, prompt, n, drafter, k)
        assert got == plain, (
            f"k={k} diverged at {next(i for i, (a, b) in enumerate(zip(got, plain)) if a != b)}"
        )
        assert stats.accepted_tokens > 0 and any(from_draft)
        assert stats.generation_tokens == n
    # The trained drafter must actually be good (a wrong detail gives ~0 acceptance).
    assert stats.acceptance_rate > 0.4


@needs_shared
def test_shared_pair_acceptance_matches_hf_report(shared_pair):
    """README of the fixture: HF gets ~0.8 acceptance at K=4 on held-out code."""
    model, drafter, tok = shared_pair
    _, _, stats = run(model, tok.encode(CODE_PROMPT), 200, drafter, 4)
    assert stats.acceptance_by_position[0] > 0.75
    assert stats.mean_tokens_per_forward > 2.5


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # E2B-like: PLE, KV sharing, double-wide MLP
        dict(moe=True, k_eq_v=True, kv_shared=0, ple=0),  # 26B-like
        dict(k_eq_v=True, kv_shared=0, ple=0),  # 31B-like
    ],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_random_pairs_lossless(variant, dtype):
    if variant.get("moe") and dtype == mx.bfloat16 and not _bf16_gather_mm():
        pytest.skip(
            "this MLX backend's gather_mm supports float32 only (MLX CPU); bf16 MoE runs on Metal"
        )
    model, drafter = make_pair(seed=7, dtype=dtype, window=8, vocab=64, centroids=0, **variant)
    prompt = list(range(4, 24))
    plain, _, _ = run(model, prompt, 60)
    for k in (1, 2, 3, 5, 8):
        got, _, _ = run(model, prompt, 60, drafter, k)
        assert got == plain, f"k={k}"


@pytest.mark.parametrize(
    "variant",
    [
        dict(centroids=16),
        dict(moe=True, k_eq_v=True, kv_shared=0, ple=0),
        dict(k_eq_v=True, kv_shared=0, ple=0),
    ],
)
def test_random_pairs_lossless_4bit(variant):
    model, drafter = make_pair(
        seed=11, dtype=mx.bfloat16, window=8, vocab=256, hidden=64, **variant
    )
    _quantize(model)
    prompt = list(range(4, 30))
    plain, _, _ = run(model, prompt, 50)
    for k in (1, 4, 7):
        got, _, _ = run(model, prompt, 50, drafter, k)
        assert got == plain


def _bf16_gather_mm() -> bool:
    x, w = mx.ones((1, 1, 1, 8), mx.bfloat16), mx.ones((2, 8, 4), mx.bfloat16)
    try:
        mx.eval(mx.gather_mm(x, w, rhs_indices=mx.array([[0]])))
    except RuntimeError:
        return False
    return True


class OracleDrafter(Drafter):
    """A drafter that always proposes the target's own greedy continuation.

    It reads the sequence position it is given, so it only agrees with the target
    if the round passes the right position; its hidden output carries the step.
    """

    def __init__(self, cfg, continuation, prompt_len, vocab):
        super().__init__(cfg)
        self.continuation, self.prompt_len, self.vocab = continuation, prompt_len, vocab

    def draft_step(self, token_embedding, hidden, shared_kv, position):
        step = (
            int(hidden[0, 0, -1].item()) if hidden.shape[-1] and hidden[0, 0, 0].item() == -7 else 0
        )
        idx = position - self.prompt_len + 1 + step
        tok = self.continuation[idx] if idx < len(self.continuation) else 0
        logits = mx.full((1, 1, self.vocab), -1e9).at[0, 0, tok].add(1e9 + 1)
        marker = mx.concatenate(
            [mx.full((1, 1, hidden.shape[-1] - 1), -7.0), mx.full((1, 1, 1), step + 1.0)], -1
        )
        return logits, marker

    def greedy_step(self, token_embedding, hidden, shared_kv, position):
        logits, marker = self.draft_step(token_embedding, hidden, shared_kv, position)
        return mx.argmax(logits, axis=-1), marker


@pytest.mark.parametrize("k", [1, 3, 8])
def test_perfect_drafter_gives_k_plus_one_tokens_per_forward(k):
    model, _ = make_pair(seed=2, window=8)
    prompt = list(range(4, 20))
    plain, _, _ = run(model, prompt, 1 + (k + 1) * 12)
    cfg = AssistantConfig.from_dict(drafter_config(target_config(window=8)))
    oracle = OracleDrafter(cfg, plain, len(prompt), model.args.vocab_size)
    got, from_draft, stats = run(model, prompt, len(plain), oracle, k)
    assert got == plain
    assert stats.rounds == 12
    assert stats.mean_tokens_per_forward == k + 1
    assert stats.acceptance_rate == 1.0
    assert sum(from_draft) == 12 * k


def test_caches_after_each_round_equal_plain_decoding():
    model, drafter = make_pair(seed=5, window=8)
    prompt = list(range(4, 30))
    sampler, k = Sampler(), 3
    cache = model.make_cache(slack=32)
    stats = GenerationStats()
    logits, hidden = prefill(model, cache, prompt, 2048, stats)
    state = RoundState(mx.argmax(logits).reshape(1).astype(mx.int32), hidden)
    seq = prompt + [state.token.item()]
    for _ in range(15):
        tokens, n, state, _ = mtp_round(model, drafter, cache, state, k, sampler)
        seq += tokens
        ref = model.make_cache()
        model(mx.array(seq[:-1])[None], ref)  # plain decoding's cache holds all but the last token
        for got, want in zip(cache, ref):
            assert got.offset == want.offset == len(seq) - 1
            for a, b in zip(got.state, want.state):
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_stop_token_inside_accepted_run_ends_generation():
    model, _ = make_pair(seed=2, window=8)
    prompt = list(range(4, 20))
    plain, _, _ = run(model, prompt, 40)
    stop = plain[10]
    cfg = AssistantConfig.from_dict(drafter_config(target_config(window=8)))
    oracle = OracleDrafter(cfg, plain, len(prompt), model.args.vocab_size)
    got, _, _ = run(model, prompt, 40, oracle, 8, stop_ids={stop})
    assert got == plain[: plain.index(stop) + 1]


@pytest.mark.parametrize("n", [1, 2, 5, 9, 17])
def test_max_tokens_is_exact(n):
    model, drafter = make_pair(seed=2, window=8)
    got, _, stats = run(model, list(range(4, 20)), n, drafter, 8)
    assert len(got) == n == stats.generation_tokens


def test_pairing_errors_name_the_mismatch():
    model, drafter = make_pair(seed=0, hidden=32)
    other, _ = make_pair(seed=0, hidden=48)
    with pytest.raises(DrafterMismatchError, match="backbone_hidden_size"):
        check_pair(other, drafter)
    with pytest.raises(DrafterMismatchError, match="not a Gemma 4 assistant"):
        check_pair(model, other)
    _, wide_window = make_pair(seed=0, window=16)
    with pytest.raises(DrafterMismatchError, match="sliding_window"):
        check_pair(model, wide_window)
    _, other_vocab = make_pair(seed=0, vocab=128)
    with pytest.raises(DrafterMismatchError, match="vocab_size"):
        check_pair(model, other_vocab)
    _, moe_drafter = make_pair(seed=0, k_eq_v=True, kv_shared=0, ple=0)  # full layers: 1 KV head
    with pytest.raises(DrafterMismatchError, match="KV heads"):
        check_pair(model, moe_drafter)
    check_pair(model, drafter)


def test_invalid_num_draft_tokens():
    model, drafter = make_pair(seed=0)
    for bad in (-1, 1000, "many", 2.5):
        with pytest.raises(GenerationError):
            run(model, [4, 5], 4, drafter, bad)


def test_fixed_controller_k_zero_is_plain():
    model, drafter = make_pair(seed=4, window=8)
    plain, _, _ = run(model, list(range(4, 20)), 30)
    got, from_draft, stats = run(model, list(range(4, 20)), 30, drafter, 0)
    assert got == plain and not any(from_draft) and stats.drafted_tokens == 0


@pytest.mark.parametrize("centroids", [0, 16])
def test_greedy_step_equals_argmax_of_draft_logits(centroids):
    model, drafter = make_pair(seed=9, window=8, vocab=256, hidden=64, centroids=centroids)
    cache = model.make_cache()
    model(mx.array(list(range(4, 40)))[None], cache)
    kv = {lt: cache[i].committed() for lt, i in model.args.producers.items()}
    for t in range(5, 25):
        emb = model.embed(mx.array([[t]]))
        hidden = mx.random.normal((1, 1, 64), key=mx.random.key(t))
        logits, h1 = drafter.draft_step(emb, hidden, kv, 36)
        tok, h2 = drafter.greedy_step(emb, hidden, kv, 36)
        assert tok.item() == mx.argmax(logits[0, -1]).item()
        assert mx.array_equal(h1, h2)


class _ShadowEveryStep(FixedController):
    """Plain bursts in which every step is a shadow probe of ``depth`` drafts; with
    ``round_k`` a round of that many drafts follows each burst, else the plain steps run on.
    Records the probes and which output indices plain steps produced."""

    def __init__(self, burst: int, depth: int, round_k: int = 0):
        super().__init__(0)
        self.burst, self.depth, self.round_k, self.seen = burst, depth, round_k, []
        self.pos, self.plain_at, self.plain_next = 1, set(), True  # out[0]: the prefill's

    def choose(self):
        k = 0 if self.plain_next else self.round_k
        self.plain_next = not self.plain_next or not self.round_k
        return k

    def plain_burst(self):
        self.plain_at.update(range(self.pos, self.pos + self.burst))
        self.pos += self.burst
        return PlainBurst(self.burst, self.burst, self.depth)

    def observe(self, k, accepted, chances=None):
        self.pos += accepted + 1

    def observe_shadow(self, drafted, accepted):
        self.seen.append((drafted, accepted))


def _state_after(model, ids):
    """The decoding state with ``ids[:-1]`` in a fresh cache and ``ids[-1]`` to come,
    built one token at a time (the shape of every plain step)."""
    cache = model.make_cache(slack=32)
    _, hidden = prefill(model, cache, ids[:-1], 1, GenerationStats())
    return cache, RoundState(mx.array([ids[-1]], dtype=mx.int32), hidden)


def _expected_shadows(model, drafter, prompt, out, plain_at, depth, sampler):
    """What each shadow probe must report, from scratch: at every plain step (``out[j]``
    for j in ``plain_at``), the drafter's drafts from that step's state against the tokens
    plain steps produced next (cut where a round or the request's end follows); sampling,
    sum(min(p, q)) for the step's own token distribution."""
    expected = []
    for j in sorted(i for i in plain_at if i < len(out)):
        cache, state = _state_after(model, prompt + out[:j])
        kv, pos = drafter_kv(model, cache), cache[0].offset
        if sampler.greedy:
            drafts = draft(model, drafter, state, kv, pos, depth, sampler)[0].tolist()
            avail = 1
            while avail < depth and j + avail in plain_at and j + avail < len(out):
                avail += 1
            n = 0
            while n < avail and drafts[n] == out[j + n]:
                n += 1
            expected.append((depth, n) if n < avail else (n, n))
        else:
            logits, _ = drafter.draft_step(model.embed(state.token[None]), state.hidden, kv, pos)
            q = sampler.probs(logits[0, -1])
            p = sampler.probs(model.forward(state.token[None], cache).logits[0, -1])
            expected.append((1, mx.minimum(p, q).sum().item()))
    return expected


@needs_shared
@pytest.mark.parametrize("round_k", [0, 2])
def test_shadow_probes_score_drafts_as_a_round_would(shared_pair, round_k):
    """Greedy shadow probes (3 drafts, one per step, overlapping) report exactly the accepted
    prefix a round from that state would, scored across 5-step bursts while plain steps run
    on and cut where a round follows, and leave the output equal to plain decoding."""
    model, drafter, tok = shared_pair
    prompt = tok.encode(CODE_PROMPT)
    plain, _, _ = run(model, prompt, 24)
    ctrl = _ShadowEveryStep(burst=5, depth=3, round_k=round_k)
    stats = GenerationStats()
    out = [
        t
        for t, _ in generate_tokens(
            model,
            prompt,
            max_tokens=24,
            sampler=Sampler(),
            draft_model=drafter,
            controller=ctrl,
            stats=stats,
        )
    ]
    assert out == plain
    expected = _expected_shadows(model, drafter, prompt, out, ctrl.plain_at, 3, Sampler())
    assert sorted(ctrl.seen) == sorted(expected)
    assert len(expected) == (23 if round_k == 0 else len(ctrl.plain_at & set(range(24))))
    assert {a for _, a in ctrl.seen} >= {0, 3}  # both passing and failing drafts were seen
    if round_k:  # probes were cut by the rounds: some were scored on fewer than 3 tokens
        assert any(d < 3 for d, _ in ctrl.seen) and len(expected) < 20
    assert stats.shadow_probes == len(ctrl.seen)


@needs_shared
def test_sampled_shadow_probes_report_the_acceptance_probability(shared_pair):
    model, drafter, tok = shared_pair
    prompt = tok.encode(CODE_PROMPT)
    sampler = Sampler(temperature=1.0)
    mx.random.seed(3)
    ctrl = _ShadowEveryStep(burst=4, depth=3)  # sampling probes one draft
    out = [
        t
        for t, _ in generate_tokens(
            model, prompt, max_tokens=12, sampler=sampler, draft_model=drafter, controller=ctrl
        )
    ]
    expected = _expected_shadows(model, drafter, prompt, out, ctrl.plain_at, 1, sampler)
    assert [d for d, _ in ctrl.seen] == [1] * len(ctrl.seen) and len(ctrl.seen) == len(out) - 1
    np.testing.assert_allclose([a for _, a in ctrl.seen], [a for _, a in expected], atol=1e-5)
    assert 0.0 < sum(a for _, a in ctrl.seen) < len(ctrl.seen)
