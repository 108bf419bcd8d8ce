"""Exact speculative sampling: MTP samples follow the target's own distribution."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_mtp.sampling import Sampler, sample_from
from mlx_mtp.speculative import GenerationStats, accept, generate_tokens
from tiny_mlx import make_pair

VOCAB = 6
PROMPT = [1, 2, 3, 4, 5]


def _exact_sequence_probs(model, sampler, length):
    """P(t1..t_length | prompt) under plain sampling, by enumeration."""
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=length - 1):
        logits = model(mx.array(PROMPT + list(seq))[None])[0]
        dists = np.array(sampler.probs(logits[len(PROMPT) - 1 :]))
        p_prefix = np.prod([dists[i, t] for i, t in enumerate(seq)])
        for last in range(VOCAB):
            probs[seq + (last,)] = p_prefix * dists[length - 1, last]
    return probs


def _chi_square_p(counts, probs, n):
    """Goodness of fit with cells pooled until each expects >= 5 samples."""
    from scipy.stats import chi2

    cells = sorted(probs, key=lambda c: probs[c])
    obs, exp, acc_o, acc_e = [], [], 0, 0.0
    for c in cells:
        acc_o += counts.get(c, 0)
        acc_e += probs[c] * n
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o, acc_e = 0, 0.0
    if acc_e and exp:
        obs[-1] += acc_o
        exp[-1] += acc_e
    obs, exp = np.array(obs), np.array(exp)
    stat = ((obs - exp) ** 2 / exp).sum()
    return chi2.sf(stat, len(obs) - 1)


@pytest.mark.parametrize("temperature,top_p,k", [(0.7, 1.0, 2), (1.0, 0.9, 3), (1.0, 1.0, 1)])
def test_mtp_sampling_matches_target_distribution(temperature, top_p, k):
    pytest.importorskip("scipy")
    # A drafter that disagrees with the target often, so rejection and the residual both matter.
    model, drafter = make_pair(seed=3, vocab=VOCAB, window=4, ple=0, kv_shared=0, hidden=16)
    sampler = Sampler(temperature, top_p)
    length = 3  # tokens 2..3 come from speculative rounds
    probs = _exact_sequence_probs(model, sampler, length)
    n, counts, accepted = 1500, {}, 0
    for seed in range(n):
        mx.random.seed(seed)
        stats = GenerationStats()
        toks = [
            t
            for t, _ in generate_tokens(
                model,
                PROMPT,
                max_tokens=length,
                sampler=sampler,
                draft_model=drafter,
                num_draft_tokens=k,
                stats=stats,
            )
        ]
        counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
        accepted += stats.accepted_tokens
    assert 0 < accepted < n * (length - 1), "the test needs both accepted and rejected drafts"
    assert _chi_square_p(counts, probs, n) > 0.01
    # Single-token marginal of the second token too.
    marg = {}
    for seq, p in probs.items():
        marg[(seq[1],)] = marg.get((seq[1],), 0.0) + p
    mcounts = {}
    for seq, c in counts.items():
        mcounts[(seq[1],)] = mcounts.get((seq[1],), 0) + c
    assert _chi_square_p(mcounts, marg, n) > 0.01


def test_chi_square_detects_a_biased_sampler():
    """The statistical check has power: argmax drafting (HF's loop) is detectably biased."""
    pytest.importorskip("scipy")
    model, _ = make_pair(seed=3, vocab=VOCAB, window=4, ple=0, kv_shared=0, hidden=16)
    sampler = Sampler(1.0)
    probs = _exact_sequence_probs(model, sampler, 2)
    greedy_counts = {}
    for seed in range(600):
        mx.random.seed(seed)
        toks = [t for t, _ in generate_tokens(model, PROMPT, max_tokens=2, sampler=Sampler(0.3))]
        greedy_counts[tuple(toks)] = greedy_counts.get(tuple(toks), 0) + 1
    assert _chi_square_p(greedy_counts, probs, 600) < 0.01


def test_seeded_sampling_is_reproducible():
    model, drafter = make_pair(seed=3, vocab=32, window=4)
    runs = []
    for _ in range(2):
        mx.random.seed(123)
        runs.append(
            [
                t
                for t, _ in generate_tokens(
                    model,
                    PROMPT,
                    max_tokens=20,
                    sampler=Sampler(0.8, 0.95),
                    draft_model=drafter,
                    num_draft_tokens=3,
                )
            ]
        )
    assert runs[0] == runs[1]


def test_top_p_and_top_k_distributions():
    logits = mx.array([[2.0, 1.0, 0.5, -1.0]])
    p = np.array(Sampler(1.0, top_p=0.7).probs(logits))[0]
    full = np.exp([2.0, 1.0, 0.5, -1.0]) / np.exp([2.0, 1.0, 0.5, -1.0]).sum()
    assert p[2] == 0 and p[3] == 0 and p[0] > 0 and p[1] > 0  # mass before token 1 is 0.61 < 0.7
    np.testing.assert_allclose(p[:2], full[:2] / full[:2].sum(), rtol=1e-6)
    p = np.array(Sampler(1.0, top_k=1).probs(logits))[0]
    np.testing.assert_allclose(p, [1, 0, 0, 0])


def _draft_distributions(seed, k, vocab, sampler):
    """Target logits for k + 1 positions and drafter distributions for k: the drafter's
    logits are the target's, perturbed (a drafter that half agrees with its target)."""
    rng = np.random.default_rng(seed)
    target = 2.0 * rng.normal(size=(k + 1, vocab))
    drafter = target[:k] + 1.5 * rng.normal(size=(k, vocab))
    return mx.array(target.astype(np.float32)), sampler.probs(mx.array(drafter.astype(np.float32)))


@pytest.mark.parametrize("sampler", [Sampler(1.0), Sampler(0.7, top_p=0.9, top_k=20)])
def test_sampled_rounds_report_each_drafts_pass_probability(sampler):
    """``accept`` reports sum(min(p, q)) per draft, from the filtered distributions it
    samples from (the controller learns acceptance from it); greedy rounds report none."""
    logits, q = _draft_distributions(0, 3, 40, sampler)
    _, _, chances = accept(logits, mx.array([0, 1, 2]), q, sampler)
    p = np.array(sampler.probs(logits))
    want = np.minimum(p[:3], np.array(q)).sum(axis=-1)
    np.testing.assert_allclose(np.array(chances), want, atol=1e-5)
    assert 0.05 < want.min() and want.max() < 0.95, "the check needs non-trivial chances"
    assert accept(logits, mx.array([0, 1, 2]), None, Sampler())[2] is None


def test_a_drafts_reported_pass_probability_is_how_often_it_passes():
    """Drafts drawn from q pass as often as the reported chance says (4 standard errors)."""
    sampler = Sampler(1.0)
    logits, q = _draft_distributions(1, 1, 12, sampler)
    mx.random.seed(3)
    trials, passed, chance = 2000, 0, None
    for _ in range(trials):
        d = sample_from(q[0])[None].astype(mx.int32)
        n, _, chances = accept(logits, d, q, sampler)
        passed += n.item()
        chance = chances[0].item()
    se = (chance * (1 - chance) / trials) ** 0.5
    assert 0.1 < chance < 0.9, chance
    assert abs(passed / trials - chance) < 4 * se, (passed / trials, chance)
