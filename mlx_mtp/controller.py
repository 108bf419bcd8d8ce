"""Choosing the number of drafts per round.

``AdaptiveController`` picks k in 0..k_max for each round to maximise the
expected tokens per second, from what it measures during the run:

* the cost of a drafter step and of a target forward verifying m tokens
  (from a few timed rounds; warm-up rounds are discarded), and
* the probability that draft i is accepted given drafts 1..i-1 were
  (exponentially decayed counts, so it follows a change of regime).

Expected tokens of a round with k drafts: ``1 + sum_i prod_{j<=i} a_j``;
its cost: the observed wall time of rounds with k drafts, smoothed by a line
fitted through the times of all observed k (for an unobserved k, the lower of
the line and the model ``overhead + k * c_draft + T(k + 1)`` from split-timed
rounds).  k = 0 is a plain decoding step.  Drafting gives way to it only when
plain steps are estimated faster, but it gives way to drafting only when
drafting is estimated ``draft_margin`` faster (hysteresis: drafting keeps
measuring acceptance, plain steps do not).  While at k = 0, the controller
still probes now and then (as rarely as keeps a probe's expected loss near
1%), with the fewest drafts that could pay, to notice when drafting pays
again; a probe whose drafts all passed is followed at once by another (up to
``probe_streak``) while the estimates say drafting is within ``streak_gap`` of
paying.  A new request starts at most ``start_k`` deep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Set, Tuple


@dataclass
class RoundTiming:
    """Seconds spent in one timed round: drafting, verifying, and in all (with overhead)."""

    draft: float = 0.0
    verify: float = 0.0
    total: float = 0.0


class Controller(Protocol):
    def start_request(self) -> None: ...

    def choose(self) -> int: ...

    def plain_burst(self) -> int: ...

    def observe_plain(self, steps: int, seconds: float) -> None: ...

    def observe(self, k: int, accepted: int) -> None: ...

    def observe_cost(self, k: int, timing: RoundTiming) -> None: ...

    def observe_round_time(self, k: int, seconds: float) -> None: ...

    def wants_timing(self) -> bool: ...


class FixedController:
    """Always ``k`` drafts; times a few rounds so the stats can split drafter and target time."""

    def __init__(self, k: int, timing_every: int = 16):
        self.k = k
        self.timing_every = timing_every
        self.rounds = 0

    def start_request(self) -> None:
        pass

    def choose(self) -> int:
        return self.k

    def plain_burst(self) -> int:
        return 1 << 30  # k = 0: plain decoding to the end

    def observe_plain(self, steps: int, seconds: float) -> None:
        pass

    def observe(self, k: int, accepted: int) -> None:
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
    CALIBRATION = (4, 2, 0, 6, 3)
    CALIBRATION_BURST = 16

    def __init__(
        self,
        k_max: int = 8,
        decay: float = 0.95,
        prior_acceptance: float = 0.7,
        prior_weight: float = 2.0,
        warmup_rounds: int = 2,
        timing_every: int = 8,
        probe_interval: int = 16,
        first_burst: int = 4,
        max_probe_interval: int = 256,
        probe_budget: float = 0.01,
        request_memory: float = 0.15,
        draft_margin: float = 0.03,
        exit_margin: float = 0.0,
        start_k: int = 4,
        explore_every: int = 16,
        position_decline: float = 0.98,
        explore_floor: float = 0.75,
        stale_decay: float = 0.85,
        line_weight: float = 2.0,
        max_round_weight: int = 10,
        probe_streak: int = 3,
        streak_gap: float = 0.03,
    ):
        self.k_max = k_max
        self.request_memory = request_memory
        self.explore_every = explore_every
        self.probe_budget = probe_budget
        self.start_k = start_k
        self.draft_margin = draft_margin
        self.exit_margin = exit_margin
        self.drafting = False  # the last non-probe choice drafted
        self.first_burst = first_burst
        self.burst_ramp = max_probe_interval
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
        self.base_probe_interval = probe_interval
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self.trials = [0.0] * (k_max + 1)  # index i = draft position (1-based)
        self.hits = [0.0] * (k_max + 1)
        self.draft_cost: Optional[float] = None  # seconds per drafter step
        self.verify_cost: Dict[int, float] = {}  # tokens verified -> seconds
        self.plain_cost: Optional[float] = None  # seconds per pipelined plain step
        self.overhead = 0.0  # seconds per round outside drafting and verifying
        self.overhead_n = 0
        self.round_cost: Dict[int, float] = {}  # k -> seconds of a whole round, as observed
        self.round_seen: Set[int] = set()  # k whose first (allocating) round was dropped
        self.round_n: Dict[int, int] = {}  # k -> rounds observed (capped): weights of the line
        self._line: Optional[Tuple[float, float]] = None  # cached fit, reset by each observation
        self.rounds = 0
        self.probe_due = False
        self.plain_left = 0  # steps of the current plain burst not yet run
        self.probing = False  # the round chosen last is a probe
        self.streak = 0  # probes in a row that passed
        self.probe_streak = probe_streak  # at most this many probes follow a passed one
        self.streak_gap = streak_gap  # ... and only while drafting is estimated this close
        self.k_histogram: Dict[int, int] = {}  # rounds per k over the controller's life

    # -- estimates --------------------------------------------------------
    def acceptance(self) -> List[float]:
        """a_i for i = 1..k_max.

        Position 1 shrinks towards the rate pooled over all positions (so every round
        informs it), each later position towards the estimate of the one before it,
        a little lower: acceptance falls with the position, and rarely tried deep
        positions must not be guessed from one or two rounds.
        """
        w = self.prior_weight
        prev = (sum(self.hits) + w * self.prior_acceptance) / (sum(self.trials) + w)
        out = []
        for i in range(1, self.k_max + 1):
            prev = (self.hits[i] + w * prev) / (self.trials[i] + w)
            out.append(prev)
            prev *= self.position_decline
        return out

    def expected_tokens(self, k: int) -> float:
        """Expected tokens from a round with k drafts: 1 + sum_i prod_{j<=i} a_j."""
        return self._expected_tokens_all()[k]

    def _expected_tokens_all(self) -> List[float]:
        out, run = [1.0], 1.0
        for a in self.acceptance():
            run *= a
            out.append(out[-1] + run)
        return out

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
            n = len(pts)
            mx_ = sum(p[0] for p in pts) / n
            my_ = sum(p[1] for p in pts) / n
            var = sum((p[0] - mx_) ** 2 for p in pts)
            slope = max(0.0, sum((p[0] - mx_) * (p[1] - my_) for p in pts) / var) if var else 0.0
            m0, t0 = mx_, my_
        return max(1e-9, t0 + slope * (m - m0))

    def round_time(self, k: int) -> float:
        """Expected wall time of a round with k drafts (k = 0: one plain step).

        Whole rounds are timed at every k the controller uses, and round time is close to
        linear in k, so a line is fitted through the observed times (weighted by how often
        each k was seen).  A k seen often keeps mostly its own time; one seen once or twice
        is pulled towards the line (a k whose few rounds happened to be slow would otherwise
        never be chosen, and so never re-measured).  For a k not seen at all, the lower of
        the line and the split-timing model: optimism on purpose, so it gets tried.
        """
        if k == 0 and self.plain_cost is not None:
            return self.plain_cost
        line = self._round_line()
        if line is None:
            if k in self.round_cost:
                return self.round_cost[k]
            model = self.model_round_time(k)
            if not self.round_cost:
                return model
            near = min(self.round_cost, key=lambda j: abs(j - k))
            return min(model, model * self.round_cost[near] / self.model_round_time(near))
        fitted = max(1e-9, line[0] + line[1] * k)
        if k in self.round_cost:
            n = self.round_n[k]
            return (n * self.round_cost[k] + self.line_weight * fitted) / (n + self.line_weight)
        return min(self.model_round_time(k), fitted)

    def _round_line(self) -> Optional[Tuple[float, float]]:
        """(intercept, slope) of round time against k, weighted least squares; None below two k."""
        if self._line is None and len(self.round_cost) >= 2:
            pts = [(k, t, self.round_n[k]) for k, t in self.round_cost.items()]
            sw = sum(w for _, _, w in pts)
            mk = sum(w * k for k, _, w in pts) / sw
            mt = sum(w * t for _, t, w in pts) / sw
            var = sum(w * (k - mk) ** 2 for k, _, w in pts)
            slope = sum(w * (k - mk) * (t - mt) for k, t, w in pts) / var
            self._line = (mt - slope * mk, slope)
        return self._line

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
    def start_request(self) -> None:
        """A new prompt: keep the measured costs (they belong to this machine and pair)
        but let the new text's acceptance take over within a few rounds.

        The first rounds draft at most ``start_k`` tokens, and the cap grows as drafts
        pass (twice the longest accepted run so far): the last prompt's acceptance says
        little about this one, and a deep round that fails costs several plain steps.
        """
        for i in range(1, self.k_max + 1):
            self.trials[i] *= self.request_memory
            self.hits[i] *= self.request_memory
        self.k_cap = self.start_k
        # A burst cut short by the end of the last request resumes (see plain_burst); only a
        # burst that ran to its end makes the next plain choice a probe.  Starting every
        # request with a fresh burst would never probe once bursts outlast requests.
        self.probe_due = self.probe_due and self.plain_left == 0

    def choose(self) -> int:
        calibrating = self.rounds - self.warmup_rounds
        if calibrating < 0:
            k = max(1, self.k_max // 2)  # warm-up: compile and fill caches; timings discarded
        elif calibrating < len(self.CALIBRATION):
            # Timed rounds at several k so the verify cost curve and drafter cost are measured.
            k = min(self.k_max, self.CALIBRATION[calibrating])
        else:
            rates = self.rates()
            k = _argmax(rates, 1)
            margin = self.exit_margin if self.drafting else self.draft_margin
            if rates[k] < (1 + margin) * rates[0]:
                # Entering drafting needs a margin: the estimates are noisy, and drafting on
                # the wrong side of a close call loses more than plain steps forgo.  Leaving
                # needs none: drafting rounds keep measuring acceptance, plain steps only
                # probe, so a few unlucky rounds on text where drafting pays would otherwise
                # end it for most of a request.
                k = 0
            self.drafting = k > 0
            if k > 0:
                # Drafting pays; should that change, the first plain bursts are short, as the
                # switch may rest on two or three unlucky rounds.  Halved per drafting round,
                # not reset: one round drafted on a new request's prior (the usual first
                # round where drafting loses) must not bring back frequent probes.
                self.burst_ramp = max(self.first_burst, self.burst_ramp // 2)
            self.probing = k == 0 and self.probe_due
            if self.probing:
                k = self.probe_k()
            elif k > 0 and self.rounds % self.explore_every == self.explore_every // 2:
                # Explore: acceptance at positions past the chosen k is otherwise never
                # observed, and a pessimistic guess there would keep k small for good;
                # but not a k already measured to be far slower.
                deeper = min(self.k_max, k + 2)
                k = deeper if rates[deeper] >= self.explore_floor * rates[k] else k
            k = min(k, self.k_cap)
            self.probe_due = False
        self.k_histogram[k] = self.k_histogram.get(k, 0) + 1
        return k

    def plain_burst(self) -> int:
        """Plain steps to run before asking again (k = 0 was chosen)."""
        if self.rounds - self.warmup_rounds < len(self.CALIBRATION):
            self.rounds += 1
            return self.CALIBRATION_BURST
        if self.plain_left == 0:  # else the rest of a burst the last request cut short
            self.probe_interval = min(self.burst_ramp, self.steps_between_probes())
            self.burst_ramp = min(2 * self.burst_ramp, self.max_probe_interval)
            self.plain_left = self.probe_interval
        self.probe_due = True
        return self.plain_left

    def probe_k(self) -> int:
        """Drafts in a probe: the fewest whose round would beat plain steps (by the margin)
        if every draft passed, else one.

        Usually one, the cheapest round; deeper positions follow its measure of position 1
        (their prior chains to it; see acceptance()).  But where verifying two tokens costs
        about two steps (4-bit weights on a CPU), a one-draft round cannot pay even when it
        passes, and probes at one draft could never show that drafting pays.
        """
        need = (1 + self.draft_margin) / self.round_time(0)
        for k in range(1, self.k_max + 1):
            if (k + 1) / self.round_time(k) >= need:
                return k
        return 1

    def close_call(self) -> bool:
        """Whether the best drafting k is estimated within ``streak_gap`` of plain steps."""
        rates = self.rates()
        return max(rates[1:]) >= (1 - self.streak_gap) * rates[0]

    def steps_between_probes(self) -> int:
        """Plain steps per probe, so that what a probe is expected to lose against plain
        steps stays within ``probe_budget`` of the time between probes: a close call is
        probed every ``probe_interval`` steps (each probe sharpens the estimate), a clear
        loss up to ``max_probe_interval`` steps apart."""
        plain, k = self.round_time(0), self.probe_k()
        loss = self.round_time(k) - self.expected_tokens(k) * plain
        steps = loss / (self.probe_budget * plain)
        return int(min(self.max_probe_interval, max(self.base_probe_interval, steps)))

    def observe_plain(self, steps: int, seconds: float) -> None:
        """Plain steps run (a whole burst, or what ran of it before the request ended) and
        their cost: the k = 0 option's real price."""
        self.plain_left = max(0, self.plain_left - steps)
        if steps >= 2:
            self.plain_cost = _ema(self.plain_cost, seconds / steps)

    def observe(self, k: int, accepted: int) -> None:
        """Acceptance of one round: drafts 1..accepted passed, draft accepted+1 failed."""
        self.rounds += 1
        self.plain_left = 0  # a drafting round (or probe) ends any plain burst
        for i in range(1, self.k_max + 1):
            # Positions past k were not drafted: their old evidence goes stale faster, so
            # their estimate returns to the prior (the position before, which is being
            # observed) instead of a few old failures keeping k small for many rounds.
            keep = self.decay if i <= k else self.decay * self.stale_decay
            self.trials[i] *= keep
            self.hits[i] *= keep
        for i in range(1, min(k, accepted + 1) + 1):
            self.trials[i] += 1.0
            self.hits[i] += float(i <= accepted)
        self.k_cap = max(self.k_cap, 2 * accepted)
        if self.probing and accepted == k and self.streak < self.probe_streak and self.close_call():
            # A probe that passed probes again at once, without the plain burst between:
            # one passed probe is weak evidence (it adds one trial against the prior and the
            # last request), and where drafting pays only at high acceptance (4-bit weights
            # on a CPU) a dozen must pass before it resumes; spaced by bursts, that took most
            # of a request.  Only near the break-even point, though: on text the drafter cannot
            # guess a lucky probe changes nothing, and probing again would only lose time.
            self.probe_due = True
            self.streak += 1
        else:
            self.streak = 0
        self.probing = False

    def observe_cost(self, k: int, timing: RoundTiming) -> None:
        """Costs measured on a timed round (warm-up rounds are ignored)."""
        if self.rounds <= self.warmup_rounds:
            return
        self.verify_cost[k + 1] = _ema(self.verify_cost.get(k + 1), timing.verify)
        if k > 0:
            self.draft_cost = _ema(self.draft_cost, timing.draft / k)
        rest = max(0.0, timing.total - timing.draft - timing.verify)
        self.overhead = rest if self.overhead_n == 0 else 0.7 * self.overhead + 0.3 * rest
        self.overhead_n += 1

    def observe_round_time(self, k: int, seconds: float) -> None:
        """Wall time of a whole round (every round: it costs no extra synchronisation).

        Observed totals beat the cost model where there are any; the first round at
        each k is dropped (new shapes allocate), as are warm-up rounds.
        """
        if self.rounds <= self.warmup_rounds:
            return
        if k in self.round_seen:
            self.round_cost[k] = _ema(self.round_cost.get(k), seconds, 0.2)
            self.round_n[k] = min(self.round_n.get(k, 0) + 1, self.max_round_weight)
            self._line = None
        self.round_seen.add(k)

    def wants_timing(self) -> bool:
        r = self.rounds
        calibrating = r - self.warmup_rounds < len(self.CALIBRATION)
        return r >= self.warmup_rounds and (calibrating or r % self.timing_every == 0)


def _argmax(rates: List[float], low: int = 0) -> int:
    """Index of the highest rate at or above ``low`` (the smaller index on ties)."""
    return max(range(low, len(rates)), key=lambda k: (rates[k], -k))


def _ema(old: Optional[float], new: float, weight: float = 0.3) -> float:
    """Exponential moving average; a sample above 1.5x the average (a page fault, another
    process, the garbage collector) counts as 1.5x, so one hiccup cannot rule out a k."""
    if old is None:
        return new
    return (1 - weight) * old + weight * min(new, 1.5 * old)
