"""Adaptive k controller on synthetic cost and acceptance streams (no timing)."""

import random

import pytest

from mlx_mtp.controller import AdaptiveController, RoundTiming
from mlx_mtp.sampling import Sampler
from mlx_mtp.speculative import generate_tokens, make_controller
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
        total = k * draft_cost + verify_cost(k + 1) + 0.5
        ctrl.observe_round_time(k, total)
        if timed:
            ctrl.observe_cost(k, RoundTiming(k * draft_cost, verify_cost(k + 1), total))
        ks.append(k)
    return ks


def tail_mode(ks, last=100):
    tail = ks[-last:]
    return max(set(tail), key=tail.count)


def test_chooses_zero_when_verification_grows_faster_than_acceptance():
    ctrl = AdaptiveController()
    ks = simulate(ctrl, 300, 0.3, lambda m: 10.0 * m, 2.0, random.Random(0))
    assert ctrl.best_k() == 0
    # Plain bursts, and between them only probes (one draft each, sometimes a few in a row).
    assert set(ks[-100:]) == {0, ctrl.probe_k()} and ctrl.probe_k() == 1


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
    # ...but probes are rare in tokens: a probe here (one draft, always rejected) loses
    # 1.25 plain steps, so bursts are long enough to keep that near 1% of the time.
    assert 100 <= ctrl.probe_interval <= 256
    assert set(probes) == {1}  # the cheapest probe


def test_new_request_keeps_costs_but_relearns_acceptance():
    rng = random.Random(4)
    ctrl = AdaptiveController(k_max=8)
    cheap = lambda m: 10.0 + 0.2 * m  # noqa: E731
    simulate(ctrl, 150, 0.0, cheap, 5.0, rng)  # a prompt the drafter cannot guess
    assert ctrl.best_k() == 0 and ctrl.probe_interval > ctrl.base_probe_interval
    costs = dict(ctrl.verify_cost)
    ctrl.start_request()
    assert ctrl.verify_cost == costs
    # The next prompt is easy: within a few dozen rounds the controller drafts deep again.
    ks = simulate(ctrl, 60, 0.97, cheap, 5.0, rng)
    assert tail_mode(ks, 20) >= 3


def test_close_calls_are_probed_often_clear_losses_rarely():
    # Drafting clearly loses (verify cost grows 10x per token, 30% acceptance): probes back off.
    ctrl = AdaptiveController()
    simulate(ctrl, 200, 0.3, lambda m: 10.0 * m, 2.0, random.Random(5))
    assert ctrl.probe_interval >= 4 * ctrl.base_probe_interval
    # Near break-even (k=1 about as fast as plain): the probe interval stays short.
    ctrl = AdaptiveController()
    simulate(ctrl, 200, 0.45, lambda m: 10.0 + 4.0 * (m - 1), 0.5, random.Random(6))
    assert ctrl.best_k() == 0 or ctrl.probe_interval == ctrl.base_probe_interval


def test_observed_round_times_override_the_cost_model():
    """Split timings say k = 6 is cheap, whole rounds at k >= 3 say otherwise (e.g. memory pressure)."""
    ctrl = AdaptiveController(k_max=8)
    rng = random.Random(7)
    for _ in range(300):
        k = ctrl.choose()
        if k == 0:
            steps = ctrl.plain_burst()
            ctrl.observe_plain(steps, steps * 10.0)
            continue
        n = sum(1 for _ in iter(lambda: rng.random() < 0.9, False)) if k else 0
        n = min(n, k)
        timed = ctrl.wants_timing()
        ctrl.observe(k, n)
        model_total = k * 0.3 + 10.0 + 0.2 * (k + 1)
        ctrl.observe_round_time(k, model_total if k <= 2 else 100.0)
        if timed:
            ctrl.observe_cost(k, RoundTiming(k * 0.3, 10.0 + 0.2 * (k + 1), model_total))
    assert ctrl.best_k() in (1, 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_keeps_greedy_output_identical(seed):
    model, drafter = make_pair(seed=seed, window=8)
    prompt = list(range(4, 24))
    plain = [t for t, _ in generate_tokens(model, prompt, max_tokens=120, sampler=Sampler())]
    auto = [
        t
        for t, _ in generate_tokens(
            model,
            prompt,
            max_tokens=120,
            sampler=Sampler(),
            draft_model=drafter,
            num_draft_tokens="auto",
        )
    ]
    assert auto == plain


def test_new_request_starts_shallow_and_deepens_as_drafts_pass():
    rng = random.Random(9)
    ctrl = AdaptiveController(k_max=8, start_k=4)
    cheap = lambda m: 10.0 + 0.2 * m  # noqa: E731
    simulate(ctrl, 100, 1.0, cheap, 0.3, rng)
    assert ctrl.best_k() == 8
    ctrl.start_request()
    ks = simulate(ctrl, 3, 1.0, cheap, 0.3, rng)
    assert ks == [4, 8, 8]  # the last prompt's acceptance is not trusted blindly
    ctrl.start_request()
    ks = simulate(ctrl, 10, 0.0, cheap, 0.3, rng)  # nothing passes: never deeper than 4
    assert max(ks) <= 4


def test_one_slow_round_does_not_rule_out_its_k():
    ctrl = AdaptiveController(k_max=8)
    cheap = lambda m: 10.0 + 0.2 * m  # noqa: E731
    simulate(ctrl, 200, 0.95, cheap, 0.3, random.Random(8))
    k = ctrl.best_k()
    assert k >= 4
    before = ctrl.round_time(k)
    ctrl.observe_round_time(k, 100 * before)  # e.g. the garbage collector ran
    assert ctrl.round_time(k) <= 1.2 * before
    assert ctrl.best_k() > 0


def _priced(ctrl, observed, split):
    """Feed whole-round times for the ks in ``observed`` (twice: the first is dropped) and
    split timings from ``split(k) -> (draft, verify)`` for every k in it."""
    ctrl.rounds = ctrl.warmup_rounds + len(ctrl.CALIBRATION)
    for k, total in observed.items():
        for _ in range(2):
            ctrl.observe_round_time(k, total)
            d, v = split(k)
            ctrl.observe_cost(k, RoundTiming(d, v, d + v))


def test_untried_k_between_observed_ones_is_interpolated():
    """The split model says k = 2 is slow; whole rounds at k = 1 and 3 bracket it lower."""
    ctrl = AdaptiveController(k_max=8)
    _priced(ctrl, {1: 11.0, 3: 15.0}, lambda k: (3.0 * k, 8.0 + 2.0 * (k + 1)))
    assert ctrl.round_time(1) == 11.0 and ctrl.round_time(3) == 15.0
    assert ctrl.round_time(2) == pytest.approx(13.0)


def test_untried_k_does_not_inherit_a_slow_neighbour():
    """k = 3 was slow (observed); an untried k = 1 stays priced by the model so it gets tried."""
    ctrl = AdaptiveController(k_max=8)
    _priced(ctrl, {3: 100.0}, lambda k: (0.3 * k, 10.0 + 0.2 * (k + 1)))
    assert ctrl.round_time(1) == pytest.approx(ctrl.model_round_time(1))
    assert ctrl.round_time(1) < 20.0


def test_controllers_are_kept_per_pair():
    """What a pair's controller measured carries over to the pair's next request."""
    model, drafter = make_pair(seed=3, window=8)
    ctrl = make_controller("auto", model, drafter)
    assert ctrl is make_controller("auto", model, drafter)
    before = ctrl.rounds
    for _ in generate_tokens(
        model, list(range(4, 24)), max_tokens=40, sampler=Sampler(), draft_model=drafter
    ):
        pass
    assert ctrl.rounds > before


def test_probes_draft_enough_to_pay_when_one_draft_cannot():
    """Verifying 2 tokens costs 2 steps (as with 4-bit weights on a CPU), more tokens little
    extra: a one-draft round cannot beat plain steps even when it passes, so probes at one
    draft could never show that drafting pays again.  Probes must draft deeper."""
    rng = random.Random(9)
    ctrl = AdaptiveController(k_max=8)
    verify = lambda m: 10.0 * m if m <= 2 else 20.0 + 2.0 * (m - 2)  # noqa: E731
    simulate(ctrl, 150, 0.0, verify, 0.3, rng)  # text the drafter cannot guess: plain steps
    assert ctrl.best_k() == 0
    assert ctrl.probe_k() >= 2
    ks = simulate(ctrl, 300, 0.97, verify, 0.3, rng)  # easy text again
    first_deep = next(i for i, k in enumerate(ks) if k >= 2)
    # Within a probe or two, not after dozens of one-draft probes that pass but cannot pay.
    assert sum(1 for k in ks[:first_deep] if k > 0) <= 2
    assert tail_mode(ks, 50) >= 2


def _plain_steps_until_drafting(ctrl, rng, history_acceptance, verify):
    """Drafting has not paid (acceptance history_acceptance); then every draft passes.
    Returns the plain steps and the rounds ("b" burst, "p" probe) before it drafts again."""
    simulate(ctrl, 150, history_acceptance, verify, 2.0, rng)
    assert ctrl.best_k() == 0
    ctrl.start_request()
    plain, kinds = 0, ""
    while ctrl.best_k() == 0:
        k = ctrl.choose()
        if k == 0:
            steps = ctrl.plain_burst()
            plain += steps
            ctrl.observe_plain(steps, steps * verify(1))
            kinds += "b"
            continue
        ctrl.observe(k, k)  # easy text again: every draft passes
        ctrl.observe_round_time(k, k * 2.0 + verify(k + 1) + 0.5)
        kinds += "p"
        assert len(kinds) < 1000, "drafting never resumed"
    return plain, kinds


def test_passed_probes_near_break_even_probe_again_without_a_plain_burst():
    """Where drafting pays only at high acceptance, several probes must pass before the
    estimate says so.  Near break-even a probe that passed probes again at once (a failed
    one does not), so drafting resumes after fewer plain steps than with a burst between
    every probe; far from it (text the drafter cannot guess) probes stay spaced."""
    verify = lambda m: 10.0 + 6.0 * (m - 1)  # noqa: E731  break-even acceptance ~0.93
    streak = spaced = 0
    for seed in range(3):
        plain, kinds = _plain_steps_until_drafting(
            AdaptiveController(k_max=8), random.Random(seed), 0.8, verify
        )
        assert "pp" in kinds
        streak += plain
        spaced += _plain_steps_until_drafting(
            AdaptiveController(k_max=8, probe_streak=0), random.Random(seed), 0.8, verify
        )[0]
    assert streak <= 0.75 * spaced, (streak, spaced)
    # After text the drafter could not guess, one passed probe proves little: no streak.
    _, kinds = _plain_steps_until_drafting(
        AdaptiveController(k_max=8), random.Random(0), 0.0, verify
    )
    assert "pp" not in kinds[:12], kinds
    # A failed probe is followed by plain steps, not by another probe.
    ctrl = AdaptiveController(k_max=8)
    simulate(ctrl, 150, 0.8, verify, 2.0, random.Random(5))
    while ctrl.choose() != 0:
        ctrl.observe(1, 0)
    ctrl.plain_burst()
    k = ctrl.choose()
    assert k > 0  # the probe after the burst
    ctrl.observe(k, 0)
    assert ctrl.choose() == 0


def _drafted_share(ctrl, hits, verify, draft_cost):
    """Drive the controller along a token stream ("1": the drafter guesses that token);
    returns the share of tokens produced by drafting rounds."""
    p = drafted = 0
    while p < len(hits) - ctrl.k_max:
        k = ctrl.choose()
        if k == 0:
            steps = ctrl.plain_burst()
            ctrl.observe_plain(steps, steps * verify(1))
            p += steps
            continue
        accepted = 0
        while accepted < k and hits[p + accepted] == "1":
            accepted += 1
        ctrl.observe(k, accepted)
        ctrl.observe_round_time(k, k * draft_cost + verify(k + 1) + 0.5)
        p += accepted + 1
        drafted += accepted + 1
    return drafted / p


def test_drafting_that_pays_a_little_survives_unlucky_rounds():
    """Acceptance 0.7 where a one-draft round costs 1.6 plain steps: drafting pays ~6%.
    Entering drafting needs a margin over plain steps, leaving it does not (plain steps
    only probe, so a few unlucky rounds would otherwise end drafting for long stretches)."""
    verify = lambda m: 10.0 + 5.0 * (m - 1)  # noqa: E731
    shares = {}
    for exit_margin in (0.0, 0.03):  # the default, and leaving with the entry margin
        shares[exit_margin] = []
        for seed in range(5):
            rng = random.Random(seed)
            ctrl = AdaptiveController(k_max=8, exit_margin=exit_margin)
            simulate(ctrl, 150, 0.95, verify, 0.5, rng)  # drafting clearly paid so far
            hits = "".join("1" if rng.random() < 0.7 else "0" for _ in range(3000))
            shares[exit_margin].append(_drafted_share(ctrl, hits, verify, 0.5))
    assert min(shares[0.0]) >= 0.6, shares
    assert sum(shares[0.0]) >= sum(shares[0.03]) + 0.5, shares


def _request(ctrl, n_tokens, accept, verify, draft_cost=0.3):
    """One request as ``speculative._mtp_steps`` runs it; returns the drafting rounds' ks."""
    ctrl.start_request()
    produced, ks = 1, []
    while produced < n_tokens:
        remaining = n_tokens - produced
        k = min(ctrl.choose(), remaining - 1)
        if k <= 0:
            steps = min(ctrl.plain_burst(), remaining)  # the request may end mid-burst
            ctrl.observe_plain(steps, steps * verify(1))
            produced += steps
            continue
        n = k if accept else 0
        timed = ctrl.wants_timing()
        ctrl.observe(k, n)
        total = k * draft_cost + verify(k + 1) + 0.5
        ctrl.observe_round_time(k, total)
        if timed:
            ctrl.observe_cost(k, RoundTiming(k * draft_cost, verify(k + 1), total))
        produced += n + 1
        ks.append(k)
    return ks


def test_requests_shorter_than_the_probe_interval_still_probe():
    """A long-lived app sends short requests (32 tokens).  Once drafting clearly lost, plain
    bursts between probes outlast a request: the burst must carry over into the next request,
    or no request ever probes and drafting never resumes for the life of the process."""
    # 4-bit weights on a CPU: verifying m tokens costs nearly m steps; drafting pays only when
    # nearly every draft passes, so each request starts with plain steps, not a drafting round.
    verify = lambda m: 10.0 * m if m <= 2 else 20.0 + 8.0 * (m - 2)  # noqa: E731
    ctrl = AdaptiveController(k_max=8)
    for _ in range(40):  # text the drafter cannot guess
        _request(ctrl, 32, False, verify)
    assert ctrl.best_k() == 0 and ctrl.probe_interval > 32
    drafted = [_request(ctrl, 32, True, verify) for _ in range(40)]  # easy text again
    first = next((i for i, ks in enumerate(drafted) if len(ks) >= 3), None)
    assert first is not None and first <= 20, [len(ks) for ks in drafted]
    assert all(len(ks) >= 3 for ks in drafted[-20:]), [len(ks) for ks in drafted]


def test_generation_reports_plain_steps_of_a_burst_the_request_cut_short():
    """The decoding loop tells the controller how many steps of a plain burst ran, also when
    the request ends inside the burst (the controller carries the rest into the next one)."""

    class PlainOnly(AdaptiveController):
        def choose(self) -> int:
            return 0

        def plain_burst(self) -> int:
            return 1000  # a burst planned far past the request's end

        def observe_plain(self, steps: int, seconds: float) -> None:
            self.ran.append(steps)

    model, drafter = make_pair(seed=0, window=8)
    ctrl = PlainOnly()
    ctrl.ran = []
    out = list(
        generate_tokens(
            model,
            list(range(4, 24)),
            max_tokens=30,
            sampler=Sampler(),
            draft_model=drafter,
            controller=ctrl,
        )
    )
    assert len(out) == 30
    assert ctrl.ran == [29]  # the first token comes from the prefill
