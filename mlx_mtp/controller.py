"""Choosing the number of drafts per round.

``AdaptiveController`` picks k in 0..k_max for each round to maximise the
expected tokens per second, from what it measures during the run:

* the cost of a drafter step and of a target forward verifying m tokens
  (from a few timed rounds; warm-up rounds are discarded), and
* the probability that draft i is accepted given drafts 1..i-1 were
  (exponentially decayed counts, so it follows a change of regime; when sampling,
  each reached draft counts its pass probability ``sum(min(p, q))`` instead of its
  pass or failure: the same mean, a fraction of the variance).

Expected tokens of a round with k drafts: ``1 + sum_i prod_{j<=i} a_j``; its cost: the
observed wall time of rounds with k drafts in the request's sampling mode (sampled
rounds cost more than greedy ones, see ``WallTimes``), smoothed by a line fitted through
the times of all observed k (for an unobserved k, the lower of the line and the model
``overhead + k * c_draft + T(k + 1)`` from split-timed rounds). k = 0 is a plain
decoding step. Times are kept at a reference speed: every timed round or plain burst also
moves an estimate of how fast the machine runs now (the more, the longer it ran), so a
change that slows or speeds up rounds and plain steps alike re-prices both at once, whichever
of them is running. Drafting gives way to it only when plain steps are estimated faster, but
it gives way to drafting only when drafting is estimated ``draft_margin`` faster
(hysteresis: drafting keeps measuring acceptance, plain steps do not). While at k = 0,
the controller keeps measuring acceptance with shadow probes: a plain step now and then
also drafts from the same state (the fewest drafts that could pay, usually one), and the
drafts are scored against the tokens the target then produces, as a round would have
scored them. A shadow probe costs drafter steps and no verification (and no
synchronisation: it joins the plain step's lazy graph), so it can run every few dozen
steps (as often as keeps its cost near ``shadow_budget`` of the plain steps, a quarter
of that when sampling); sooner while the probes pass more often than the estimate
expects (by the likelihood ratio of acceptance above break-even against the estimate;
greedy, at every step of a short burst while each probe raises that ratio), and right
after drafting stops (bursts from ``first_burst`` that double, restarted at each resume
of drafting and at each greedy request that starts plain). A request that follows plain
decoding starts plain, its first steps shadow-probed (where drafting pays only
near-perfect acceptance, one step in every few while the probes pass); one that follows
drafting starts at most ``start_k`` deep. A request in the other sampling mode (greedy,
sampled) than the last starts plain, from the prior. Only rounds measure round times:
after a long plain run, where drafting could pay were rounds half as dear, one round
runs to re-measure, and where it is faster than its price it re-scales every k's time
(rarer while re-measures find the times right). Likewise, only plain steps measure the
plain price: while drafting, after ``plain_remeasure_every`` rounds without plain steps,
where plain steps would win were they half as dear, a short plain burst re-measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Protocol, Sequence, Set, Tuple, Union

NOTHING_UNPRICED = (0, 0.0, 0)  # (steps, seconds, drafter steps): see observe_plain


@dataclass
class RoundTiming:
    """Seconds spent in one timed round: drafting, verifying, and in all (with overhead)."""

    draft: float = 0.0
    verify: float = 0.0
    total: float = 0.0


@dataclass
class WallTimes:
    """Wall times observed in one sampling mode.  Sampled rounds also build and sample
    from the drafter's and the target's distributions, which greedy rounds do not, and a
    sampled plain step pays only its own share of that: on the shared pair a sampled round
    costs about 10% more than a greedy one, a sampled plain step 5%.  Priced with one
    mode's rounds and the other's plain steps, drafting on sampled text looks cheaper than
    it is, and a close call is lost."""

    plain: Optional[float] = None  # seconds per pipelined plain step
    rounds: Dict[int, float] = field(default_factory=dict)  # k -> seconds of a whole round
    seen: Set[int] = field(default_factory=set)  # k whose first (allocating) round was dropped
    n: Dict[int, int] = field(default_factory=dict)  # k -> rounds observed (capped): weights
    _line: Optional[Tuple[float, float]] = None  # cached fit, reset by each observation

    def observe(self, k: int, seconds: float, max_weight: int) -> None:
        """A whole round with k drafts took ``seconds`` (the first one at each k is dropped)."""
        if k in self.seen:
            self.rounds[k] = _ema(self.rounds.get(k), seconds, 0.2)
            self.n[k] = min(self.n.get(k, 0) + 1, max_weight)
            self._line = None
        self.seen.add(k)

    def rescale(self, ratio: float, weight: float) -> bool:
        """A round took ``ratio`` times its k's recorded time: move every k's time that way
        (by ``ratio ** weight``, at most 1.5x either way: one round's time is noisy).  True
        if the times moved by more than 5%."""
        factor = min(1.5, max(1 / 1.5, ratio**weight))
        self.rounds = {k: factor * t for k, t in self.rounds.items()}
        self._line = None
        return abs(factor - 1.0) > 0.05

    def line(self) -> Optional[Tuple[float, float]]:
        """(intercept, slope) of round time against k, weighted least squares; None below two k."""
        if self._line is None and len(self.rounds) >= 2:
            mk, mt, slope = centred_line([(k, t, self.n[k]) for k, t in self.rounds.items()])
            self._line = (mt - slope * mk, slope)
        return self._line


class PlainBurst(NamedTuple):
    """Plain steps to run; the first ``probes`` of them also shadow-probe ``depth`` drafts."""

    steps: int
    probes: int = 0
    depth: int = 1


class Controller(Protocol):
    def start_request(self, sampled: bool = False) -> None: ...

    def choose(self) -> int: ...

    def plain_burst(self) -> PlainBurst: ...

    def observe_plain(self, steps: int, seconds: float, drafter_steps: int = 0) -> None: ...

    def observe_shadow(self, drafted: int, accepted: float) -> None: ...

    def observe(self, k: int, accepted: int, chances: Optional[Sequence[float]] = None) -> None: ...

    def observe_cost(self, k: int, timing: RoundTiming) -> None: ...

    def observe_round_time(self, k: int, seconds: float) -> None: ...

    def wants_timing(self) -> bool: ...


class FixedController:
    """Always ``k`` drafts; times a few rounds so the stats can split drafter and target time."""

    def __init__(self, k: int, timing_every: int = 16):
        self.k = k
        self.timing_every = timing_every
        self.rounds = 0

    def start_request(self, sampled: bool = False) -> None:
        pass

    def choose(self) -> int:
        return self.k

    def plain_burst(self) -> PlainBurst:
        return PlainBurst(1 << 30)  # k = 0: plain decoding to the end, no shadow probes

    def observe_plain(self, steps: int, seconds: float, drafter_steps: int = 0) -> None:
        pass

    def observe_shadow(self, drafted: int, accepted: float) -> None:
        pass

    def observe(self, k: int, accepted: int, chances: Optional[Sequence[float]] = None) -> None:
        self.rounds += 1

    def observe_cost(self, k: int, timing: RoundTiming) -> None:
        pass

    def observe_round_time(self, k: int, seconds: float) -> None:
        pass

    def wants_timing(self) -> bool:
        return self.rounds >= 2 and (self.rounds < 8 or self.rounds % self.timing_every == 0)


class AdaptiveController:
    """Online choice of k from measured costs and acceptance (see module docstring)."""

    # Timed rounds at several k measure the verify-cost curve and the drafter cost; the one
    # k = 0 entry, a short plain burst, prices plain steps, which are pipelined and cost less
    # than a 1-token verify round (extrapolating the verify curve to 1 token overprices them).
    # Its first step's wait is the switch from a round and its last step is read after the
    # controller is told (see speculative._plain_run), so 16 steps are timed: enough to be
    # priced (see min_priced_steps).
    CALIBRATION = (4, 2, 0, 6, 3)
    CALIBRATION_BURST = 18

    def __init__(
        self,
        k_max: int = 8,
        decay: float = 0.95,
        prior_acceptance: float = 0.7,
        prior_weight: float = 2.0,
        warmup_rounds: int = 2,
        timing_every: int = 8,
        first_burst: int = 4,
        min_shadow_interval: int = 8,
        max_shadow_interval: int = 64,
        shadow_budget: float = 0.01,
        start_shadows: int = 2,
        request_memory: float = 0.15,
        carry_cap: float = 2.0,
        draft_margin: float = 0.03,
        exit_margin: float = 0.0,
        start_k: int = 4,
        explore_every: int = 16,
        position_decline: float = 0.98,
        explore_floor: float = 0.75,
        stale_decay: float = 0.85,
        line_weight: float = 2.0,
        max_round_weight: int = 10,
        max_shadow_odds: float = 16.0,
        min_shadow_odds: float = 0.5,
        full_value_gain: float = 0.25,
        min_probe_value: float = 0.125,
        max_probe_run: int = 16,
        probe_run_budget: float = 2.0,
        max_probe_share: float = 0.06,
        remeasure_every: int = 256,
        remeasure_drop: float = 0.5,
        stale_weight: float = 0.5,
        plain_remeasure_every: int = 128,
        plain_remeasure_steps: int = 6,
        plain_remeasure_weight: float = 0.7,
        close_call: float = 0.1,
        close_call_rounds: int = 64,
        sampled_probe_share: float = 0.25,
        speed_halflife: float = 4.0,
        min_priced_steps: int = 16,
        max_speed_gain: float = 0.8,
    ):
        self.k_max = k_max
        self.request_memory = request_memory
        self.carry_cap = carry_cap
        self.explore_every = explore_every
        self.shadow_budget = shadow_budget
        self.sampled_probe_share = sampled_probe_share
        self.speed_halflife = speed_halflife
        self.min_priced_steps = min_priced_steps
        # Plain steps (steps, seconds, drafter steps) not priced yet: see observe_plain.
        self.unpriced: Tuple[int, float, int] = NOTHING_UNPRICED
        self.max_speed_gain = max_speed_gain
        # How slow the machine runs now relative to when the prices were first taken: every
        # price is kept at reference speed (seconds / speed), see _track_speed.
        self.speed = 1.0
        self.min_shadow_interval = min_shadow_interval
        self.max_shadow_interval = max_shadow_interval
        self.start_shadows = start_shadows
        self.max_probe_run = max_probe_run
        self.probe_run_budget = probe_run_budget
        self.max_probe_share = max_probe_share
        self.remeasure_every = remeasure_every
        self.remeasure_drop = remeasure_drop
        self.stale_weight = stale_weight
        self.plain_remeasure_every = plain_remeasure_every
        self.plain_remeasure_steps = plain_remeasure_steps
        self.plain_remeasure_weight = plain_remeasure_weight
        self.close_call = close_call
        self.close_call_rounds = close_call_rounds
        self.close_share = 0.0  # share of recent drafting choices that were close calls
        self.max_shadow_odds = max_shadow_odds
        self.min_shadow_odds = min_shadow_odds
        self.full_value_gain = full_value_gain
        self.min_probe_value = min_probe_value
        self.start_k = start_k
        self.draft_margin = draft_margin
        self.exit_margin = exit_margin
        self.drafting = False  # the last choice drafted
        self.first_burst = first_burst
        self.burst_ramp = max_shadow_interval
        self.k_cap = k_max
        self.position_decline = position_decline
        self.explore_floor = explore_floor
        self.stale_decay = stale_decay
        self.line_weight = line_weight
        self.max_round_weight = max_round_weight
        self.decay = decay
        self.prior_acceptance = prior_acceptance
        self.prior_weight = prior_weight
        self.warmup_rounds = warmup_rounds
        self.timing_every = timing_every
        self.trials = [0.0] * (k_max + 1)  # index i = draft position (1-based)
        self.hits = [0.0] * (k_max + 1)
        self.draft_cost: Optional[float] = None  # seconds per drafter step
        self.verify_cost: Dict[int, float] = {}  # tokens verified -> seconds
        self.overhead = 0.0  # seconds per round outside drafting and verifying
        self.overhead_n = 0
        # Observed wall times per sampling mode (False: greedy, True: sampled).
        self.walls: Dict[bool, WallTimes] = {False: WallTimes(), True: WallTimes()}
        self.rounds = 0
        self.request_start = False  # no choice made yet in this request
        self.last_sampled: Optional[bool] = None  # the last request's mode (None: no request yet)
        self.starting_plain = False  # this request started plain: its first bursts shadow-probe
        self.probe_run_failed = False  # a probe of the request's opening run failed
        self.shadow_odds = 1.0  # evidence from shadow probes that acceptance is above the estimate
        self.odds_rising = False  # the last scored shadow probe raised shadow_odds
        self.k_histogram: Dict[int, int] = {}  # rounds per k over the controller's life
        self.plain_since_round = 0  # plain steps since the last drafting round
        self.remeasure_interval = remeasure_every  # grows while re-measures find no change
        self.stale_round = False  # the last round came after remeasure_interval plain steps
        self.remeasures = 0  # rounds run to re-measure round times (see remeasure_k)
        self.rounds_since_plain = 0  # drafting rounds since plain steps were last timed
        self.plain_remeasure_interval = plain_remeasure_every  # grows while prices hold
        self.plain_remeasuring = False  # the coming plain burst re-measures the plain price
        self.remeasure_close = False  # ... in a close call (see _plain_price_stale)
        self.plain_remeasures = 0  # plain bursts run to re-measure the plain price

    # -- estimates --------------------------------------------------------
    def acceptance(self) -> List[float]:
        """a_i for i = 1..k_max.

        Position 1 shrinks towards the rate pooled over all positions (so every round
        informs it), each later position towards the estimate of the one before it,
        a little lower: acceptance falls with the position, and rarely tried deep
        positions must not be guessed from one or two rounds.
        """
        return self._acceptance(self.trials, self.hits)

    def _acceptance(self, trials: List[float], hits: List[float]) -> List[float]:
        """``acceptance()`` from the given evidence (index i = draft position)."""
        w = self.prior_weight
        prev = (sum(hits) + w * self.prior_acceptance) / (sum(trials) + w)
        out = []
        for i in range(1, self.k_max + 1):
            prev = (hits[i] + w * prev) / (trials[i] + w)
            out.append(prev)
            prev *= self.position_decline
        return out

    def expected_tokens(self, k: int) -> float:
        """Expected tokens from a round with k drafts: 1 + sum_i prod_{j<=i} a_j."""
        return self._expected_tokens_all()[k]

    def _expected_tokens_all(self) -> List[float]:
        return _tokens_by_k(self.acceptance())

    def verify_time(self, m: int) -> float:
        """Estimated seconds to verify m tokens: measured, else a linear fit."""
        if m in self.verify_cost:
            return self.verify_cost[m]
        pts = sorted(self.verify_cost.items())
        if not pts:
            return 1.0
        if len(pts) == 1:
            (m0, t0), slope = pts[0], 0.1 * pts[0][1] / pts[0][0]  # optimistic until measured
        else:
            m0, t0, slope = centred_line([(x, y, 1.0) for x, y in pts])
            slope = max(0.0, slope)
        return max(1e-9, t0 + slope * (m - m0))

    def round_time(self, k: int) -> float:
        """Expected wall time of a round with k drafts (k = 0: one plain step).

        Whole rounds are timed at every k the controller uses, and round time is close to
        linear in k, so a line is fitted through the observed times (weighted by how often
        each k was seen).  A k seen often keeps mostly its own time; one seen once or twice
        and slower than the line is pulled towards it (a k whose few rounds happened to be
        slow would otherwise never be chosen, and so never re-measured).  For a k not seen
        at all, the lower of
        the line and the split-timing model: optimism on purpose, so it gets tried.
        """
        if k == 0 and self.plain_cost is not None:
            return self.plain_cost
        own, other = self._walls()
        if own.line() is not None or not other.rounds:
            return self._round_time_in(own, k)
        # This mode has too few rounds of its own for a line: the other mode's times,
        # scaled by how the two modes' costs compare where both were measured.
        return self._mode_scale(own, other) * self._round_time_in(other, k)

    def _round_time_in(self, walls: WallTimes, k: int) -> float:
        """``round_time(k)`` (k > 0) from the wall times of one mode (see round_time)."""
        line = walls.line()
        if line is None:
            if k in walls.rounds:
                return walls.rounds[k]
            model = self.model_round_time(k)
            if not walls.rounds:
                return model
            near = min(walls.rounds, key=lambda j: abs(j - k))
            return min(model, model * walls.rounds[near] / self.model_round_time(near))
        fitted = max(1e-9, line[0] + line[1] * k)
        if k in walls.rounds:
            # The line may pull a rarely seen k's time down (optimism: choosing it measures
            # it again), never up: at k = 0 no rounds run, so a k priced too high would
            # never be measured again.
            n, seen = walls.n[k], walls.rounds[k]
            return min(seen, (n * seen + self.line_weight * fitted) / (n + self.line_weight))
        return min(self.model_round_time(k), fitted)

    @staticmethod
    def _mode_scale(own: WallTimes, other: WallTimes) -> float:
        """Round time in this mode relative to the other: from rounds at a k both measured,
        else from their plain steps, else 1."""
        common = [k for k in own.rounds if k in other.rounds]
        if common:
            return sum(own.rounds[k] for k in common) / sum(other.rounds[k] for k in common)
        if own.plain and other.plain:
            return own.plain / other.plain
        return 1.0

    def _walls(self) -> Tuple[WallTimes, WallTimes]:
        """(this request's mode's wall times, the other mode's)."""
        sampled = bool(self.last_sampled)
        return self.walls[sampled], self.walls[not sampled]

    @property
    def plain_cost(self) -> Optional[float]:
        """Seconds per pipelined plain step in this request's sampling mode (the other
        mode's until this one's is measured)."""
        own, other = self._walls()
        return own.plain if own.plain is not None else other.plain

    def model_round_time(self, k: int) -> float:
        """The split-timing model of a round: overhead + k drafter steps + verifying k + 1."""
        return self.overhead + k * (self.draft_cost or 0.0) + self.verify_time(k + 1)

    def rates(self) -> List[float]:
        """Expected tokens per second for k = 0..k_max."""
        tokens = self._expected_tokens_all()
        return [tokens[k] / self.round_time(k) for k in range(self.k_max + 1)]

    def best_k(self, low: int = 0) -> int:
        """The k in low..k_max with the highest expected rate (the smaller on ties)."""
        return _argmax(self.rates(), low)

    # -- protocol -----------------------------------------------------------
    def start_request(self, sampled: bool = False) -> None:
        """A new prompt (``sampled``: not greedy): keep the measured costs (they belong to
        this machine and pair) but let the new text's acceptance take over within a few
        rounds.

        The first rounds draft at most ``start_k`` tokens, and the cap grows as drafts
        pass (twice the longest accepted run so far): the last prompt's acceptance says
        little about this one, and a deep round that fails costs several plain steps.
        A request sampled where the last was greedy (or the reverse) keeps none of its
        acceptance and starts plain, its first steps shadow-probed: greedy drafts pass
        when they equal the target's argmax, sampled ones with probability
        ``sum(min(p, q))``, so one mode's rate says nothing about the other's.
        """
        switched = self.last_sampled is not None and sampled != self.last_sampled
        self.last_sampled = sampled
        for i in range(1, self.k_max + 1):
            # At most ``carry_cap`` rounds' worth per position: shadow probes gather many
            # observations, and the last prompt's must not outweigh this one's first few.
            cap = self.carry_cap / max(self.trials[i], 1e-9)
            keep = 0.0 if switched else min(self.request_memory, cap)
            self.trials[i] *= keep
            self.hits[i] *= keep
        if switched:
            self.drafting, self.shadow_odds = False, 1.0  # choose() then starts plain
            self.odds_rising = False
        self.k_cap = self.start_k
        self.request_start = True
        self.unpriced = NOTHING_UNPRICED

    def choose(self) -> int:
        calibrating = self.rounds - self.warmup_rounds
        if calibrating < 0:
            k = max(1, self.k_max // 2)  # warm-up: compile and fill caches; timings discarded
        elif calibrating < len(self.CALIBRATION):
            # Timed rounds at several k so the verify cost curve and drafter cost are measured.
            k = min(self.k_max, self.CALIBRATION[calibrating])
        elif self.request_start and not self.drafting:
            # The last request ended in plain steps: this one starts plain too, and its first
            # steps shadow-probe (see plain_burst).  Drafting first on the new request's
            # prior-pulled estimate would cost a failed deep round on text the drafter
            # cannot guess; the shadow probes decide within two steps, almost for free.
            k = 0
            self._start_plain()
        else:
            rates = self.rates()
            k = _argmax(rates, 1)
            margin = self.exit_margin if self.drafting else self.draft_margin
            if rates[k] < (1 + margin) * rates[0]:
                # Entering drafting needs a margin: the estimates are noisy, and drafting on
                # the wrong side of a close call loses more than plain steps forgo.  Leaving
                # needs none: drafting rounds keep measuring acceptance, plain steps only
                # shadow-probe position 1, so a few unlucky rounds on text where drafting
                # pays would otherwise end it for most of a request.
                k = self.remeasure_k()
                if k > 0:
                    self.remeasures += 1
                    return self._chosen(k)  # a round to re-measure its cost, not a resume
            if k > 0:
                close = float(self._close_call(rates, k))
                self.close_share += (close - self.close_share) / self.close_call_rounds
            if k > 0 and self.drafting and self._plain_price_stale(rates, k):
                self.plain_remeasures += 1
                self.plain_remeasuring = True
                self.remeasure_close = self._in_close_call()
                return self._chosen(0)  # a plain burst to re-measure its price; drafting goes on
            if k > 0 and not self.drafting:
                # Drafting resumes: should it stop again, the first plain bursts are short
                # (their shadow probes come often), as the stop may rest on two or three
                # unlucky rounds, and text that turned easy often stays easy.  Only a resume
                # resets the ramp (a request drafting on its prior does not), and bursts are
                # longer where probes can find less (see probe_value).
                self.burst_ramp = int(self.first_burst / self.probe_value())  # value <= 1
            self.drafting = k > 0
            if k > 0 and self.rounds % self.explore_every == self.explore_every // 2:
                # Explore: acceptance at positions past the chosen k is otherwise never
                # observed, and a pessimistic guess there would keep k small for good;
                # but not a k already measured to be far slower.
                deeper = min(self.k_max, k + 2)
                k = deeper if rates[deeper] >= self.explore_floor * rates[k] else k
            k = min(k, self.k_cap)
            if k == 0 and self.request_start:
                self._start_plain()  # its prior no longer pays: probe its first steps
            elif k > 0:
                self.starting_plain = False
        return self._chosen(k)

    def _chosen(self, k: int) -> int:
        """Book the choice of k (the request's first choice is made; the histogram) and
        return it."""
        self.request_start = False
        self.k_histogram[k] = self.k_histogram.get(k, 0) + 1
        return k

    def plain_burst(self) -> PlainBurst:
        """Plain steps to run before asking again (k = 0 was chosen), and their shadow probes."""
        if self.rounds - self.warmup_rounds < len(self.CALIBRATION):
            self.rounds += 1
            return PlainBurst(self.CALIBRATION_BURST)  # prices plain steps: no drafter time
        if self.plain_remeasuring:
            # A close call's re-measure prices plain steps on its own: as many timed steps
            # as the calibration's.
            steps = self.CALIBRATION_BURST if self.remeasure_close else self.plain_remeasure_steps
            return PlainBurst(steps)  # no probes: rounds measure acceptance
        depth = self.shadow_depth()
        if self.starting_plain:
            opening = self._opening_probes(depth)
            if opening is not None:
                return opening
        interval = self.shadow_interval(depth)
        steps = min(self.burst_ramp, interval)
        self.burst_ramp = min(2 * self.burst_ramp, max(interval, self.max_shadow_interval))
        if self.shadow_odds > 1.0:
            # Probes passed more often than the estimate expects, as if acceptance were above
            # break-even: text the drafter had missed may have turned easy, and each step
            # spent plain there forgoes most of a drafting round's gain, so the next probe
            # comes that many times sooner.  Where the estimate is right, passes and
            # failures balance, and the budget holds on average.
            steps = max(self.first_burst, int(steps / self.shadow_odds))
            streak = self._probe_streak(depth)
            if streak is not None:
                return streak
        return PlainBurst(max(steps, depth, self._fewest_probe_spacing(depth)), 1, depth)

    def _probe_streak(self, depth: int) -> Optional[PlainBurst]:
        """A short burst that shadow-probes every step, or None: greedy, while each probe
        raises ``shadow_odds``.

        Where text the drafter missed turns easy, the estimate needs many passes to climb to
        break-even (about ten from 0.4 to 0.7), and one probe per burst spent dozens of plain
        steps on them (a benchmark code prompt that opened with ten missed tokens: 46 plain
        steps, then every draft passed).  Each streak probe costs its drafter steps, so a
        streak is as long as ``first_burst`` scaled by ``probe_value`` (none where drafting
        could gain little), and at most what an opening run may spend; the first failure
        ends it.  Sampled probes measure each draft's chance to pass, so one tells more, and
        streaks there cost the random-text class more than they found."""
        if not self.odds_rising or self.last_sampled:
            return None
        n = int(min(self.first_burst, self._probe_run_length(depth)) * self.probe_value())
        return PlainBurst(max(n, depth), n, depth) if n > 1 else None

    def _fewest_probe_spacing(self, depth: int) -> int:
        """Plain steps per probe of ``depth`` drafts below which the probes' drafter steps
        would cost more than ``max_probe_share`` of the plain steps' time.  However often
        the probes pass or drafting stopped, this bounds what they can lose on text where
        drafting never pays (4-bit weights on a CPU: a 3-draft probe costs most of a step)."""
        cost = self._probe_cost(depth)
        return 1 if cost is None else math.ceil(cost / self.max_probe_share)

    def _probe_cost(self, depth: int) -> Optional[float]:
        """The drafter time of a probe of ``depth`` drafts, in plain steps (None until both
        are measured): what the probe spacing and the opening runs are budgeted in."""
        if not self.draft_cost or not self.plain_cost:
            return None
        return depth * self.draft_cost / self.plain_cost

    def _start_plain(self) -> None:
        """This request starts plain: its first bursts are its opening probes.  Greedy, the
        bursts after them start short, as after a resume of drafting: the text is new, and
        two probes that each pass or fail see little of it (in the offline replay, a code
        request whose first ten tokens the drafter missed, and nearly every later one it
        guessed, ran 86 plain steps in bursts of 21 and 44 before it drafted).  A sampled
        probe measures the chance that the draft passes, ``sum(min(p, q))``, so the opening
        tells more there, and the extra probes cost the adversarial class more than they
        found."""
        self.starting_plain, self.probe_run_failed = True, False
        if not self.last_sampled:
            self.burst_ramp = int(self.first_burst / self.probe_value())

    def _opening_probes(self, depth: int) -> Optional[PlainBurst]:
        """The next burst of a request that starts plain, or None once its opening probes
        are over (then the usual spacing applies).

        Where ``start_shadows`` passes could make drafting pay, they are probed on the first
        steps at once.  Where it takes more (verifying costs nearly a step per token, so
        drafting pays only near-perfect acceptance), the request probes one step in every
        ``depth + 1`` (each probe scored before the next is planned, their tokens apart) for
        as long as the probes pass and the passes that could still make drafting pay cost
        at most ``probe_run_budget`` plain steps of drafter time (and number at most
        ``max_probe_run``): text the drafter guesses well then drafts after several probes,
        and on other text the first failure (usually the first probe) ends the run.  The
        budget bounds what a run can lose where drafting turns out not to pay after all.
        """
        if self._passes_could_pay(self.start_shadows, depth):
            self.starting_plain = False
            n = self.start_shadows
            return PlainBurst(n + depth - 1, n, depth)
        if self.probe_run_failed:
            self.starting_plain = False
            return None
        # One draft per probe where passes of it alone could do (fewer drafter steps than a
        # deeper probe; deeper positions follow position 1, see acceptance()).
        for d in sorted({1, depth}):
            if self._passes_could_pay(self._probe_run_length(d), d):
                return PlainBurst(d + 1, 1, d)
        self.starting_plain = False
        return None

    def _probe_run_length(self, depth: int) -> int:
        """The most probes of ``depth`` drafts an opening run may take (see _opening_probes)."""
        cost = self._probe_cost(depth)
        if cost is None:
            return self.max_probe_run
        return min(self.max_probe_run, int(self.probe_run_budget / cost))

    def _plain_price_stale(self, rates: List[float], k: int) -> bool:
        """Should a short plain burst re-measure the plain price before this round of k?

        Only plain steps measure the plain price, and while drafting none run: where the
        machine was slow during the last plain steps and is fast again while it drafts, the
        plain price stays slow against rounds priced fast, and a round of one draft can even
        look cheaper than a plain step (stock bfloat16, sampled random text: plain priced at
        20.1 ms while k = 1 rounds took 17.7-19.9 ms, true plain 11.8 ms; nine requests
        drafted at 0.92 of plain decoding).  So after ``plain_remeasure_interval`` rounds
        without plain steps, where plain steps would be chosen were they half as dear as
        recorded, a burst of ``plain_remeasure_steps`` re-measures them.  Where drafting
        gains more than twice, no price drop could change the choice, and none runs.

        In a close call (drafting estimated to gain less than ``close_call`` at most recent
        choices, see _in_close_call) a few percent of price error decide the choice, and a
        plain burst costs next to nothing there: the re-measure comes every
        ``plain_remeasure_every`` rounds, without backing off, and is long enough to price
        plain steps against the rounds on its own (see observe_plain).  Sampled random text,
        bfloat16: one-draft rounds priced 7% cheap drafted eight whole requests at 0.95 of
        plain decoding."""
        interval = self.plain_remeasure_interval
        if self._in_close_call():
            interval = min(interval, self.plain_remeasure_every)
        if self.rounds_since_plain < interval:
            return False
        return rates[0] / (1 - self.remeasure_drop) >= rates[k]

    def _close_call(self, rates: List[float], k: int) -> bool:
        """Is drafting k estimated to gain less than ``close_call`` over plain steps?"""
        return rates[k] < (1 + self.close_call) * rates[0]

    def _in_close_call(self) -> bool:
        """Were most recent drafting choices close calls (a moving share over about
        ``close_call_rounds`` choices)?  A dip of the acceptance estimate on text where
        drafting pays well (prose, bfloat16: gains of 60%) passes sooner, and an 18-step
        re-measure there forgoes most of its gain (same-process A/B, re-measuring at any
        close call: prose -2.9%).  Not a streak: the estimate crosses the line now and then."""
        return self.close_share > 0.5

    def remeasure_k(self) -> int:
        """A k to run one drafting round of although plain steps are estimated faster (0:
        none): when no round ran for ``remeasure_interval`` plain steps and drafting could
        pay were rounds ``remeasure_drop`` cheaper than their recorded times, the most often
        measured k (of those, the nearest the k that would then be best at the estimated
        acceptance).

        Only rounds measure round times, while plain steps are measured all the time: where
        the machine was slow while it drafted (another process, the CPU clocking down) and
        is fast again by the time it runs plain steps, rounds stay priced slow against plain
        steps priced fast, and without a round nothing corrects it (a CPU hog during four
        4-bit requests left rounds priced at twice their time, and every later request ran
        plain).  The round re-scales every k's time (see ``observe_round_time``), so its k
        is one whose time is well known: a rarely seen k's own error re-scaled them all
        (4-bit, round prices set 15% too dear: a one-draft re-measure, priced from the line,
        made them 10% dearer still, and prose where drafting pays 10% ran plain for twelve
        requests).  While re-measures find the times right, they come rarer.
        """
        if self.plain_since_round < self.remeasure_interval:
            return 0
        times = self._round_times()
        cheaper = [times[0]] + [(1 - self.remeasure_drop) * t for t in times[1:]]
        if self._fewest_paying_k(1.0, cheaper) is None:
            return 0  # drafting could not pay even then
        tokens = self._expected_tokens_all()
        ideal = min(_argmax([tokens[k] / cheaper[k] for k in range(self.k_max + 1)], 1), self.k_cap)
        seen = self._walls()[0].n
        return max(seen, key=lambda j: (seen[j], -abs(j - ideal))) if seen else ideal

    def shadow_depth(self) -> int:
        """Drafts per shadow probe: the fewest whose round would beat plain steps (by the
        margin) if all passed, else one.

        Usually one, the cheapest; deeper positions follow its measure of position 1 (their
        prior chains to it; see acceptance()).  But where verifying two tokens costs about
        two steps (4-bit weights on a CPU) only deep rounds can pay, and only evidence
        that deep drafts pass can show it.
        """
        return self._fewest_paying_k(1.0, self._round_times()) or 1

    def shadow_interval(self, depth: Optional[int] = None) -> int:
        """Plain steps per shadow probe of ``depth`` drafts (default ``shadow_depth()``), so
        that the drafter steps they add stay within ``shadow_budget`` of the plain steps' time,
        scaled by ``probe_value()`` (as are the most steps between probes)."""
        cost = self._probe_cost(self.shadow_depth() if depth is None else depth)
        if cost is None:
            return self.min_shadow_interval
        # A sampled probe observes the chance its draft passes, ``sum(min(p, q))``, not one
        # pass or failure: on the shared pair its variance is 0.1-0.25 of a pass/fail's at
        # the same mean (temperature 1-0.7), so a quarter as many tell as much.
        scale = self.probe_value() * (self.sampled_probe_share if self.last_sampled else 1.0)
        steps = cost / (scale * self.shadow_budget)
        return int(min(self.max_shadow_interval / scale, max(self.min_shadow_interval, steps)))

    def probe_value(self) -> float:
        """What shadow probes can find, from ``min_probe_value`` to 1: the speed-up over plain
        steps that drafting would bring where it clearly pays (acceptance halfway between
        break-even and 1), relative to ``full_value_gain``.

        Where verifying costs almost a plain step per token (4-bit weights on a CPU), even
        text the drafter guesses well gains a few percent, while each probe costs its
        drafter steps on every text: a budget meant for gains of 25% and more would cost
        more than drafting could win back.
        """
        times = self._round_times()
        be = self.break_even_acceptance(times)
        if be >= 1.0:
            return self.min_probe_value
        tokens = _tokens_by_k([0.5 * (1.0 + be)] * self.k_max)
        gain = max(tokens[k] / times[k] for k in range(1, self.k_max + 1)) * times[0]
        return min(1.0, max(self.min_probe_value, (gain - 1.0) / self.full_value_gain))

    def _passes_could_pay(self, n: int, depth: int) -> bool:
        """Would drafting pay (by the entry margin) if ``n`` more probes of ``depth`` drafts
        all passed?  If not, probing a request's first steps cannot change its start."""
        trials, hits = list(self.trials), list(self.hits)
        for i in range(1, depth + 1):
            trials[i] += n
            hits[i] += n
        return (
            self._fewest_paying_k(self._acceptance(trials, hits), self._round_times()) is not None
        )

    def break_even_acceptance(self, times: Optional[List[float]] = None) -> float:
        """The acceptance per draft at which drafting would beat plain steps by the entry
        margin, were it the same at every position (above 1: drafting cannot pay);
        ``times``: ``_round_times()``, if the caller has them."""
        times = self._round_times() if times is None else times
        if self._fewest_paying_k(1.0, times) is None:
            return 2.0
        low, high = 0.0, 1.0
        for _ in range(12):  # bisection to ~1e-4
            mid = 0.5 * (low + high)
            low, high = (low, mid) if self._fewest_paying_k(mid, times) else (mid, high)
        return high

    def _round_times(self) -> List[float]:
        """``round_time(k)`` for k = 0..k_max."""
        return [self.round_time(k) for k in range(self.k_max + 1)]

    def _fewest_paying_k(self, a: Union[float, List[float]], times: List[float]) -> Optional[int]:
        """The fewest drafts whose round beats plain steps by the entry margin when draft i
        passes with probability ``a[i - 1]`` given the drafts before it did (a float: the
        same at every position), or None; ``times``: ``_round_times()``."""
        tokens = _tokens_by_k([a] * self.k_max if isinstance(a, float) else a)
        need = (1 + self.draft_margin) / times[0]
        return next((k for k in range(1, self.k_max + 1) if tokens[k] / times[k] >= need), None)

    def observe_plain(self, steps: int, seconds: float, drafter_steps: int = 0) -> None:
        """Plain steps timed in steady state (token read to token read, the pipeline full),
        their wall time and the shadow probes' drafter steps among them: the k = 0 option's
        price.

        Bursts are priced together until they span ``min_priced_steps`` (but for a
        re-measure, see _plain_price_stale): a shadow probe's drafter steps run
        asynchronously, after its step's token can be read, so part of their time lands in
        the steps after it, possibly the next burst's, and a burst of two or three steps
        times little more than the switch from or to a round.  Priced alone, short bursts
        (an opening run: two steps and a three-draft probe) looked up to 40% cheaper than a
        plain step, each cut the plain price by up to 10%, and on 4-bit weights, where
        drafting pays ~10% at best, it soon could not pay at any acceptance (4-bit prose ran
        plain for the rest of the run)."""
        self.plain_since_round += steps
        remeasure, self.plain_remeasuring = self.plain_remeasuring, False
        n, t, d = self.unpriced
        steps, seconds, drafter_steps = n + steps, t + seconds, d + drafter_steps
        if steps < self.min_priced_steps and not remeasure:
            self.unpriced = (steps, seconds, drafter_steps)
            return
        self.unpriced = NOTHING_UNPRICED
        if steps >= 2:
            self.rounds_since_plain = 0
            own = self._walls()[0]
            seconds = max(1e-9, seconds - drafter_steps * (self.draft_cost or 0.0) * self.speed)
            if remeasure and own.plain is not None:
                # A re-measure outweighs the old price (it is the stale one); while prices
                # hold, re-measures come rarer (up to 8x), one that finds a change restores them.
                if self.remeasure_close:
                    # The rounds just before it timed the machine's speed, so the surprise is
                    # the plain price's alone.  (Through _track_speed most of it went into the
                    # speed, which the next rounds took back: rounds priced cheap stayed
                    # cheap.)  Only a long burst is precise enough for that: four timed steps
                    # vary by 10%.
                    per_step = seconds / steps / self.speed
                else:
                    per_step = self._track_speed(own.plain, seconds / steps, seconds)
                changed = abs(per_step / own.plain - 1.0) > 0.1
                self.plain_remeasure_interval = _backoff(
                    self.plain_remeasure_interval, self.plain_remeasure_every, changed
                )
                own.plain = _ema(own.plain, per_step, self.plain_remeasure_weight)
            else:
                own.plain = _ema(own.plain, self._track_speed(own.plain, seconds / steps, seconds))

    def observe_shadow(self, drafted: int, accepted: float) -> None:
        """A shadow probe: ``drafted`` drafts at a plain step, scored against the target's
        tokens as a round would have (greedy: the first ``accepted`` passed; sampling, one
        draft: the probability that speculative sampling accepts it, ``sum(min(p, q))``)."""
        be = self.break_even_acceptance()
        if self.starting_plain and accepted < drafted * be:
            self.probe_run_failed = True  # evidence against drafting: the opening run ends
        self._weigh_shadow(drafted, accepted, be)
        self._record(drafted, accepted)

    def _weigh_shadow(self, drafted: int, accepted: float, be: float) -> None:
        """Update ``shadow_odds``: how much likelier the recent shadow probes are if
        acceptance were clearly above break-even (halfway to 1) than at the estimate (a
        likelihood ratio over the compared draft positions whose estimate is below
        break-even).  Where the estimate is right the ratio does not grow on average,
        however often drafts pass; where text the drafter missed has turned easy, it grows
        with every pass.  ``be``: ``break_even_acceptance()``."""
        if be >= 1.0:
            self.shadow_odds = self.min_shadow_odds  # drafting cannot pay: no evidence can help
            self.odds_rising = False
            return
        easy = 0.5 * (1.0 + be)  # the alternative: acceptance where drafting clearly pays
        ratio = 1.0
        for i, a in enumerate(self.acceptance()[:drafted]):
            if a >= be:
                break  # the estimate is already there
            x = min(1.0, accepted - i)  # draft i+1 passed (sampling: its chance to)
            ratio *= (easy / a) ** x * ((1 - easy) / (1 - a)) ** (1 - x)
            if x < 1.0:
                break  # later drafts were not compared
        # Bounded both ways: above, a long run of passes must not make every step a probe;
        # below, only a little, so evidence against the estimate soon counts again (at 1,
        # a boundary the ratio could not go below, it would drift up where the estimate is
        # right but passes are common).
        self.odds_rising = ratio > 1.0
        self.shadow_odds = min(
            self.max_shadow_odds, max(self.min_shadow_odds, self.shadow_odds * ratio)
        )

    def observe(self, k: int, accepted: int, chances: Optional[Sequence[float]] = None) -> None:
        """Acceptance of one round: drafts 1..accepted passed, draft accepted+1 failed.

        ``chances`` (sampling): each draft's probability to pass given the drafts before it
        passed, ``sum(min(p, q))``.  Recorded for the drafts the round reached in place of
        pass or fail: the same mean, and a fraction of the variance, so the estimate near
        break-even no longer swings across it every few rounds."""
        self.rounds += 1
        self.rounds_since_plain += 1
        self.unpriced = NOTHING_UNPRICED  # their probes' time spilled into this round
        self.stale_round = self.plain_since_round >= self.remeasure_interval
        self.plain_since_round = 0
        if chances is None:
            self._record(k, accepted)
        else:
            self._record_chances(k, chances[: min(k, accepted + 1)])
        self.k_cap = max(self.k_cap, 2 * accepted)

    def _record(self, k: int, accepted: float) -> None:
        """Evidence of one round (or shadow probe) that drafted k: the first ``accepted``
        passed, the next failed; a fractional part is the next draft's chance to pass."""
        whole = min(k, int(accepted))
        self._record_chances(k, [1.0] * whole + ([accepted - whole] if whole < k else []))

    def _record_chances(self, k: int, chances: Sequence[float]) -> None:
        """Evidence of one round that drafted k: draft i was reached and passed with
        probability ``chances[i - 1]`` (1 or 0 where it is known to have passed or failed)."""
        self._decay(k)
        for i, c in enumerate(chances, start=1):
            self.trials[i] += 1.0
            self.hits[i] += c

    def _decay(self, k: int) -> None:
        """Age the acceptance evidence by one round that drafted k."""
        for i in range(1, self.k_max + 1):
            # Positions past k were not drafted: their old evidence goes stale faster, so
            # their estimate returns to the prior (the position before, which is being
            # observed) instead of a few old failures keeping k small for many rounds.
            keep = self.decay if i <= k else self.decay * self.stale_decay
            self.trials[i] *= keep
            self.hits[i] *= keep

    def observe_cost(self, k: int, timing: RoundTiming) -> None:
        """Costs measured on a timed round (warm-up rounds are ignored)."""
        if self.rounds <= self.warmup_rounds:
            return
        verify, draft = timing.verify / self.speed, timing.draft / self.speed
        self.verify_cost[k + 1] = _ema(self.verify_cost.get(k + 1), verify)
        if k > 0:
            self.draft_cost = _ema(self.draft_cost, draft / k)
        rest = max(0.0, timing.total / self.speed - draft - verify)
        self.overhead = rest if self.overhead_n == 0 else 0.7 * self.overhead + 0.3 * rest
        self.overhead_n += 1

    def observe_round_time(self, k: int, seconds: float) -> None:
        """Wall time of a whole round (every round: it costs no extra synchronisation).

        Observed totals beat the cost model where there are any; they are kept per
        sampling mode (see ``WallTimes``).  The first round at each k is dropped (new
        shapes allocate), as are warm-up rounds.
        """
        if self.rounds <= self.warmup_rounds:
            return
        walls = self._walls()[0]
        if self.stale_round and k in walls.rounds:
            # The first round after a long plain run: plain steps tracked the machine's speed
            # meanwhile, but rounds may have sped up unlike them.  Only faster: interference
            # (another process, the collector) adds time and never takes it away, so one round
            # slower than its price is as likely a hiccup as a change, and where plain steps
            # already win, rounds priced dearer change nothing.  Scaled up by single slow
            # rounds, round prices only climbed (4-bit, stock: two re-measures took k = 2 from
            # 2.94 to 3.15 plain steps, where fixed-k rounds took 2.83, and code and prose ran
            # plain from then on, at 0.97 of the best fixed k).  Where drafting is chosen,
            # its rounds re-price a k that did become slower.
            ratio = seconds / self.speed / walls.rounds[k]
            changed = walls.rescale(min(1.0, ratio), self.stale_weight)
            # On text where drafting does not pay each re-measure costs a little.
            self.remeasure_interval = _backoff(
                self.remeasure_interval, self.remeasure_every, changed
            )
        else:
            price = self._track_speed(walls.rounds.get(k), seconds, seconds)
            walls.observe(k, price, self.max_round_weight)

    def _track_speed(self, price: Optional[float], seconds: float, duration: float) -> float:
        """``seconds`` observed for something priced ``price`` at reference speed (None:
        not yet priced), over ``duration`` seconds of wall time: move ``speed`` towards the
        ratio (the more, the longer the observation: half way per ``speed_halflife``) and
        return the observation at reference speed.

        This shared machine runs one request 30% slower or faster than the last (another
        process, the clock), for plain steps and rounds alike, and only one of them runs at
        a time: priced in seconds, rounds timed in a fast request and plain steps in a slow
        one looked cheap for the rest of the run.  At reference speed, a change that hits
        both moves neither's price, and what plain steps see re-prices rounds (and the
        reverse) at once.  An observation moves at most 1.5x at a time (a hiccup)."""
        step = self.plain_cost
        if price is not None and step is not None:
            ratio = min(1.5, max(1 / 1.5, seconds / (self.speed * price)))
            steps = duration / (self.speed * step)  # the observation's length in plain steps
            gain = min(self.max_speed_gain, 1.0 - 0.5 ** (steps / self.speed_halflife))
            self.speed *= ratio**gain
        return seconds / self.speed

    def wants_timing(self) -> bool:
        r = self.rounds
        calibrating = r - self.warmup_rounds < len(self.CALIBRATION)
        return r >= self.warmup_rounds and (calibrating or r % self.timing_every == 0)


def _tokens_by_k(accs: List[float]) -> List[float]:
    """Expected tokens of a round with k = 0..len(accs) drafts, when draft i passes with
    probability ``accs[i - 1]`` given the drafts before it did: ``1 + sum_i prod_{j<=i} a_j``."""
    out, run = [1.0], 1.0
    for a in accs:
        run *= a
        out.append(out[-1] + run)
    return out


def _argmax(rates: List[float], low: int = 0) -> int:
    """Index of the highest rate at or above ``low`` (the smaller index on ties)."""
    return max(range(low, len(rates)), key=lambda k: (rates[k], -k))


def centred_line(points: List[Tuple[float, float, float]]) -> Tuple[float, float, float]:
    """Weighted least-squares line through ``(x, y, weight)`` points, as ``(mean x, mean y,
    slope)``: the line is ``mean_y + slope * (x - mean_x)`` (slope 0 if every x is equal)."""
    sw = sum(w for _, _, w in points)
    mx = sum(w * x for x, _, w in points) / sw
    my = sum(w * y for _, y, w in points) / sw
    var = sum(w * (x - mx) ** 2 for x, _, w in points)
    cov = sum(w * (x - mx) * (y - my) for x, y, w in points)
    return mx, my, (cov / var if var else 0.0)


def _backoff(interval: int, every: int, changed: bool) -> int:
    """The spacing of the next re-measure: back to ``every`` after one that found a change,
    else twice the last, up to ``8 * every`` (each costs a little where nothing changed)."""
    return every if changed else min(8 * every, 2 * interval)


def _ema(old: Optional[float], new: float, weight: float = 0.3) -> float:
    """Exponential moving average; a sample above 1.5x the average (a page fault, another
    process, the garbage collector) counts as 1.5x, so one hiccup cannot rule out a k."""
    if old is None:
        return new
    return (1 - weight) * old + weight * min(new, 1.5 * old)
