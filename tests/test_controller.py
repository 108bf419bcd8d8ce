"""Adaptive k controller on synthetic cost and acceptance streams (no timing)."""

import random

import pytest

from mlx_mtp.controller import AdaptiveController, RoundTiming
from mlx_mtp.sampling import Sampler
from mlx_mtp.speculative import generate_tokens
from tiny_mlx import make_pair


def simulate(ctrl, rounds, accept_p, verify_cost, draft_cost, rng):
    """Drive the controller with a synthetic machine; returns the ks it chose."""
    ks = []
    for _ in range(rounds):
        k = ctrl.choose()
        if k == 0:
            steps = ctrl.plain_burst()
            ctrl.observe_plain(steps, steps * verify_cost(1))
            ks.append(0)
            continue
        n = 0
        while n < k and rng.random() < accept_p:
            n += 1
        timed = ctrl.wants_timing()
        ctrl.observe(k, n)
        if timed:
            ctrl.observe_cost(k, RoundTiming(k * draft_cost, verify_cost(k + 1), k * draft_cost + verify_cost(k + 1) + 0.5))
        ks.append(k)
    return ks


def tail_mode(ks, last=100):
    tail = ks[-last:]
    return max(set(tail), key=tail.count)


def test_chooses_zero_when_verification_grows_faster_than_acceptance():
    ctrl = AdaptiveController()
    ks = simulate(ctrl, 300, 0.3, lambda m: 10.0 * m, 2.0, random.Random(0))
    assert tail_mode(ks) == 0
    assert ctrl.best_k() == 0


def test_chooses_large_k_when_drafts_always_pass_and_verify_is_cheap():
    ctrl = AdaptiveController(k_max=8)
    ks = simulate(ctrl, 300, 1.0, lambda m: 10.0 + 0.2 * m, 0.3, random.Random(0))
    assert tail_mode(ks) == 8


def test_moderate_regime_picks_an_interior_k():
    ctrl = AdaptiveController(k_max=8)
    ks = simulate(ctrl, 400, 0.75, lambda m: 10.0 + 1.5 * m, 0.5, random.Random(1))
    assert 2 <= tail_mode(ks) <= 6


def test_recovers_after_regime_change():
    rng = random.Random(2)
    ctrl = AdaptiveController(k_max=8)
    cheap = lambda m: 10.0 + 0.2 * m  # noqa: E731
    simulate(ctrl, 200, 0.95, cheap, 0.3, rng)
    assert ctrl.best_k() >= 4
    # Drafts stop being accepted: fall back to plain decoding...
    ks = simulate(ctrl, 200, 0.0, cheap, 0.3, rng)
    assert tail_mode(ks, 50) == 0
    # ...and drafting pays again: the periodic probes notice.
    ks = simulate(ctrl, 300, 0.95, cheap, 0.3, rng)
    assert tail_mode(ks, 50) >= 4


def test_plain_bursts_while_at_zero_keep_probing():
    ctrl = AdaptiveController(max_probe_interval=256)
    ks = simulate(ctrl, 400, 0.0, lambda m: 10.0 * m, 2.0, random.Random(3))
    probes = [k for k in ks[len(ctrl.CALIBRATION) + 2 :] if k > 0]
    assert len(probes) >= 10  # it never stops checking
    # ...but probes are rare in tokens: bursts grow to 256 plain steps between them.
    assert ctrl.probe_interval == 256


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_keeps_greedy_output_identical(seed):
    model, drafter = make_pair(seed=seed, window=8)
    prompt = list(range(4, 24))
    plain = [t for t, _ in generate_tokens(model, prompt, max_tokens=120, sampler=Sampler())]
    auto = [t for t, _ in generate_tokens(model, prompt, max_tokens=120, sampler=Sampler(),
                                          draft_model=drafter, num_draft_tokens="auto")]
    assert auto == plain
