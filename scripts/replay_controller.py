"""Replay the adaptive controller offline: recorded drafts, measured costs, no timing noise.

    python scripts/bench_mtp.py --json bench.json ...       # measures the cost curves
    python scripts/replay_controller.py --costs bench.json [--traces traces.json] [--json out.json]

``bench_mtp.py`` measures wall clock on a shared CPU: one 6-prompt pass carries a few percent
of noise per configuration, and its reference (the best of nine measured configurations) is
biased upward by that noise.  This script asks the same question without it.  It records, for
every position of the greedy continuation of each code and prose prompt of the benchmark,
how many of the drafter's 8 greedy drafts the target would accept (greedy drafts do not depend
on k, so a round with k drafts at that position accepts ``min(k, L)``; exact on the stock
wheel, whose verify forwards are bit-identical to plain steps).  Then it replays the
benchmark's runs (warm-up, then the classes in order, 6 prompts x 128 tokens) for plain
decoding, every fixed k and ``AdaptiveController``, charging each round the cost measured
for its k in the benchmark JSON (round time = tokens per target forward / tokens per second),
with a lognormal jitter (``--jitter``) so the controller sees noisy costs as on a real
machine.  The adversarial (sampled) class draws acceptance at random from the benchmark's
measured acceptance by position: each draft's pass probability, ``sum(min(p, q))``, from a beta
around its position's mean (variance 0.2 of a pass/fail's, as measured on the shared pair), then
pass or fail with that probability; rounds and shadow probes report the probability.
``--swing`` also scales each request's costs by a lognormal factor (the same for every
configuration): this machine's plain decoding ran 50 tok/s in one request and 78 in the next,
and a controller must price rounds and plain steps measured at different speeds.
``--controller-rev`` replays the controller of another git revision (compare two runs with the
same seeds). ``--against REV`` also replays REV's controller on the same seeds and reports the
mean per-seed difference of auto / best with its standard error (the seeds' jitter and swing
hit both alike, so a pair separates smaller differences than two means). ``--smooth`` charges
rounds a line fitted through the measured costs of k = 1..8: each k's cost carries the
benchmark's noise, and the best fixed k in a replay profits from a k measured lucky (openblas
bfloat16 code: k = 5 at 2.83 plain steps, between k = 4 at 3.08 and k = 6 at 3.54).

Prints auto / max(plain, best fixed k) per (regime, dtype, class) averaged over ``--seeds``
jitter seeds, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import log, on_line, table, write_json  # noqa: E402

from mlx_mtp.controller import (
    AdaptiveController,
    Controller,
    FixedController,
    RoundTiming,
)  # noqa: E402

K_MAX = 8
CLASSES = ("code", "prose", "adversarial")
CONFIGS = ["plain"] + list(range(1, K_MAX + 1)) + ["auto"]


def record_traces(n_prompts: int, n_tokens: int, dtype: str) -> Dict[str, List[List[int]]]:
    """Accepted-draft counts L(p) at every position of each greedy code and prose run."""
    import mlx.core as mx

    import bench_mtp
    from mlx_mtp.loading import load
    from mlx_mtp.sampling import Sampler
    from mlx_mtp.speculative import (
        MAX_DRAFT_TOKENS,
        GenerationStats,
        RoundState,
        draft,
        drafter_kv,
        prefill,
    )

    _, tok = load(str(bench_mtp.TARGET_SRC))
    classes = bench_mtp.prompts(tok, n_prompts)
    target, drafter, _ = bench_mtp.load_pair(dtype)
    greedy = Sampler(0.0)
    out: Dict[str, List[List[int]]] = {}
    for cls in ("code", "prose"):
        out[cls] = []
        for ids in classes[cls]:
            cache = target.make_cache(slack=MAX_DRAFT_TOKENS + 16)
            logits, hidden = prefill(target, cache, ids, 2048, GenerationStats())
            state = RoundState(mx.argmax(logits).reshape(1).astype(mx.int32), hidden)
            tokens, chains = [], []
            for _ in range(n_tokens + K_MAX):
                kv = drafter_kv(target, cache)
                drafts, _ = draft(target, drafter, state, kv, cache[0].offset, K_MAX, greedy)
                res = target.forward(state.token[None], cache, return_hidden=True)
                nxt = mx.argmax(res.logits[0, -1]).reshape(1).astype(mx.int32)
                mx.eval(drafts, nxt)
                tokens.append(state.token.item())
                chains.append(drafts.tolist())
                state = RoundState(nxt, res.hidden)
            out[cls].append([_match(chains[p], tokens[p + 1 :]) for p in range(n_tokens)])
        log(f"traces: {cls} done")
    return out


def _match(drafts: Sequence[int], truth: Sequence[int]) -> int:
    n = 0
    while n < len(drafts) and drafts[n] == truth[n]:
        n += 1
    return n


def smoothed(curve: Dict) -> Dict:
    """``curve`` with the round costs of k = 1..K_MAX on their least-squares line."""
    line = on_line({k: curve["round"][k] for k in range(1, K_MAX + 1)})
    return {**curve, "round": {0: curve["round"][0], **line}}


def cost_curves(bench: dict) -> Dict[tuple, Dict]:
    """Per (regime, dtype, greedy|sampled): seconds per round for k = 0..8, drafter step seconds,
    and (sampled) acceptance of draft i given drafts 1..i-1 passed."""
    regime = bench["regime"]["regime"]
    out: Dict[tuple, Dict] = {}
    for r in bench["rows"]:
        if r["class"] == "prose" or r["k"] == "auto":
            continue
        kind = "sampled" if r["class"] == "adversarial" else "greedy"
        c = out.setdefault((regime, r["dtype"], kind), {"round": {}, "draft": 0.0})
        if r["k"] == "plain":
            c["round"][0] = 1.0 / r["tps"]
            continue
        c["round"][r["k"]] = r["tokens_per_target_forward"] / r["tps"]
        c["draft"] = max(c["draft"], (r["drafter_step_ms"] or 0.0) / 1e3)
        if kind == "sampled" and r["k"] == K_MAX:
            reach = [1.0] + list(r["acceptance_by_position"])  # P(draft i accepted)
            cond = [min(1.0, b / a) if a > 0 else 0.0 for a, b in zip(reach, reach[1:])]
            c["accept"] = (cond + [0.0] * K_MAX)[:K_MAX]  # positions never reached: rejected
    return out


class Machine:
    """Charges rounds their measured cost, jittered, times the request's ``speed``."""

    def __init__(self, curves: Dict, rng: random.Random, jitter: float, burst_start: float):
        self.curves, self.rng, self.jitter, self.burst_start = curves, rng, jitter, burst_start
        self.speed = 1.0  # this request's cost factor (see --swing)

    def seconds(self, kind: str, k: int, steps: int = 1) -> float:
        base = self.curves[kind]["round"][k] * steps
        extra = self.burst_start * self.curves[kind]["round"][0] if k == 0 else 0.0
        return self.speed * (base * math.exp(self.rng.gauss(0.0, self.jitter)) + extra)


def replay_request(
    ctrl: Optional[Controller],
    machine: Machine,
    n_tokens: int,
    trace: Optional[List[int]] = None,
    accept: Optional[List[float]] = None,
    rng: Optional[random.Random] = None,
) -> float:
    """Seconds of one request, following ``speculative._mtp_steps`` (plain if ``ctrl`` is None)."""
    kind = "greedy" if trace is not None else "sampled"
    if ctrl is None:
        return machine.seconds(kind, 0, n_tokens - 1)
    ctrl.start_request(sampled=trace is None)
    produced, total = 1, 0.0
    while produced < n_tokens:
        remaining = n_tokens - produced
        k = min(ctrl.choose(), remaining - 1)
        if k <= 0:
            plan = ctrl.plain_burst()
            steps = min(plan.steps, remaining)
            probes, depth = min(plan.probes, steps), plan.depth if trace is not None else 1
            for s in range(probes):  # shadow probes (cut at the burst end; _plain_run cuts them
                # only where a round or the request end follows)
                if trace is None:
                    ctrl.observe_shadow(1, chance(rng, accept[0]))  # as sum(min(p, q))
                    continue
                avail = min(depth, steps - s)
                n = min(avail, trace[produced - 1 + s])
                ctrl.observe_shadow(depth if n < avail else n, n)
            dt = machine.seconds(kind, 0, steps) + probes * depth * machine.curves[kind]["draft"]
            ctrl.observe_plain(steps, dt, probes * depth)
            produced, total = produced + steps, total + dt
            continue
        timed = ctrl.wants_timing()
        if trace is not None:
            n, chances = min(k, trace[produced - 1]), None
        else:
            n, chances = 0, []
            while n < k:
                chances.append(chance(rng, accept[n]))
                if rng.random() >= chances[-1]:
                    break
                n += 1
        ctrl.observe(k, n, chances)
        dt = machine.seconds(kind, k)
        ctrl.observe_round_time(k, dt)
        if timed:
            drafting = k * machine.curves[kind]["draft"]
            ctrl.observe_cost(k, RoundTiming(drafting, max(0.0, dt - drafting), dt))
        produced, total = produced + n + 1, total + dt
    return total


# A sampled draft passes with probability sum(min(p, q)) at its position, which varies from token
# to token around the position's acceptance: on the shared pair its variance was 0.10-0.25 of a
# pass/fail's at the same mean (temperature 1 and 0.7).  Modelled as a beta of variance 0.2 of it.
CHANCE_CONCENTRATION = 1 / 0.2 - 1


def chance(rng: random.Random, mean: float) -> float:
    """The pass probability, ``sum(min(p, q))``, of one sampled draft whose position passes
    with probability ``mean`` on average."""
    if mean <= 0.0 or mean >= 1.0:
        return min(1.0, max(0.0, mean))
    c = CHANCE_CONCENTRATION
    return rng.betavariate(c * mean, c * (1 - mean))


def replay_pair(traces, curves, seed: int, args, adaptive=AdaptiveController):
    """One benchmark pass of one (regime, dtype): seconds per (class, configuration)."""
    rng = random.Random(seed)
    machine = Machine(curves, rng, args.jitter, args.burst_start)
    n_tokens = args.new_tokens
    ctrls = {
        k: None if k == "plain" else adaptive() if k == "auto" else FixedController(k)
        for k in CONFIGS
    }
    warm_accept = [0.8] * K_MAX  # sampled warm-up on a code prompt
    for k in CONFIGS:  # warm-up, as bench_mtp: 64 tokens greedy and sampled on the first prompt
        replay_request(ctrls[k], machine, 64, trace=traces["code"][0])
        replay_request(ctrls[k], machine, 64, accept=warm_accept, rng=random.Random(seed))
    seconds = {}
    for cls in CLASSES:
        tot = {k: 0.0 for k in CONFIGS}
        for pi in range(len(traces.get(cls, traces["code"]))):  # adversarial: as many as code
            swing = random.Random(f"{seed} {cls} {pi}").gauss(0.0, args.swing)
            for k in CONFIGS:
                machine.speed = math.exp(swing)
                if cls == "adversarial":
                    acc_rng = random.Random(1000 * seed + pi)  # same text luck for every config
                    tot[k] += replay_request(
                        ctrls[k], machine, n_tokens, accept=curves["sampled"]["accept"], rng=acc_rng
                    )
                else:
                    tot[k] += replay_request(ctrls[k], machine, n_tokens, trace=traces[cls][pi])
        seconds[cls] = tot
        machine.speed = 1.0
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--costs", nargs="+", required=True, help="bench_mtp.py JSON file(s)")
    ap.add_argument("--traces", default=None, help="trace JSON to reuse (recorded if missing)")
    ap.add_argument("--trace-dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--jitter", type=float, default=0.05, help="lognormal sigma of round costs")
    ap.add_argument(
        "--burst-start", type=float, default=0.1, help="plain steps lost per plain burst"
    )
    ap.add_argument(
        "--swing", type=float, default=0.0, help="lognormal sigma of each request's speed"
    )
    ap.add_argument("--controller-rev", default=None, help="git revision of the controller")
    ap.add_argument("--smooth", action="store_true", help="round costs on a line in k")
    ap.add_argument(
        "--against",
        default=None,
        help="git revision: also replay its controller, seed by seed, and report the mean "
        "difference of auto / best (this one minus that one) with its standard error",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    adaptive, against = AdaptiveController, None
    if args.controller_rev or args.against:
        from ab_controller import controller_at

        adaptive = controller_at(args.controller_rev) if args.controller_rev else adaptive
        against = controller_at(args.against) if args.against else None
    if args.traces and Path(args.traces).exists():
        traces = json.loads(Path(args.traces).read_text())
    else:
        traces = record_traces(args.prompts, args.new_tokens + 1, args.trace_dtype)
        if args.traces:
            Path(args.traces).write_text(json.dumps(traces))
    rows = []
    for path in args.costs:
        all_curves = cost_curves(json.loads(Path(path).read_text()))
        for regime, dtype in sorted({key[:2] for key in all_curves}):
            if any((regime, dtype, kind) not in all_curves for kind in ("greedy", "sampled")):
                log(f"{path}: {regime} {dtype} lacks the code or adversarial class; skipped")
                continue
            curves = {kind: all_curves[(regime, dtype, kind)] for kind in ("greedy", "sampled")}
            if args.smooth:
                curves = {kind: smoothed(c) for kind, c in curves.items()}
            rows += _rows(regime, dtype, traces, curves, args, adaptive, against)
    if not rows:
        sys.exit("no (regime, dtype) with both the code and adversarial classes in --costs")
    heads = ["regime", "dtype", "class", "auto_vs_plain", "best_fixed", "auto_vs_best"]
    heads += ["minus_against", "se"] if against is not None else []
    print(
        f"replay: {args.seeds} seeds, jitter sigma {args.jitter}, swing sigma {args.swing}, "
        f"{'smoothed' if args.smooth else 'measured'} costs, controller "
        f"{args.controller_rev or 'this checkout'}; auto / max(plain, best k)"
        + (f"; paired against {args.against}" if against is not None else "")
    )
    cells = [[_cell(h, r[h]) for h in heads] for r in rows]
    print(table(heads, cells))
    worst = min(r["auto_vs_best"] for r in rows)
    print(f"worst auto / max(plain, best fixed k): {worst:.3f}")
    write_json(args.json, {"args": vars(args), "rows": rows})


def _rows(regime, dtype, traces, curves, args, adaptive, against=None) -> List[dict]:
    """Rows of one (regime, dtype): auto / max(plain, best fixed k) per class over the seeds;
    with ``against`` (another controller class), also the mean per-seed difference of that
    ratio (this controller's minus the other's, both against this replay's fixed k) and its
    standard error: the seeds' jitter and swing hit both alike, so the pair tells more than
    two separate means."""
    sums = {c: {k: 0.0 for k in CONFIGS} for c in CLASSES}
    diffs: Dict[str, List[float]] = {c: [] for c in CLASSES}
    for seed in range(args.seeds):
        secs = replay_pair(traces, curves, seed, args, adaptive)
        other = replay_pair(traces, curves, seed, args, against) if against else None
        for cls in CLASSES:
            for k in CONFIGS:
                sums[cls][k] += secs[cls][k]
            if other is not None:
                best = min(v for k, v in secs[cls].items() if k != "auto")
                diffs[cls].append(best / secs[cls]["auto"] - best / other[cls]["auto"])
    rows = []
    for cls in CLASSES:
        s = sums[cls]
        best = min((k for k in CONFIGS if k != "auto"), key=lambda k: s[k])
        row = {
            "regime": regime,
            "dtype": dtype,
            "class": cls,
            "auto_vs_plain": round(s["plain"] / s["auto"], 3),
            "best_fixed": best,
            "auto_vs_best": round(s[best] / s["auto"], 3),
        }
        if against is not None:
            row["minus_against"], row["se"] = _mean_se(diffs[cls])
        rows.append(row)
    return rows


def _cell(head: str, value):
    """A table cell: signed differences with 4 decimals, other ratios with 3."""
    if head == "minus_against":
        return f"{value:+.4f}"
    if head == "se":
        return f"{value:.4f}"
    return f"{value:.3f}" if isinstance(value, float) else value


def _mean_se(xs: List[float]) -> tuple:
    """Mean and standard error of the mean (0 for fewer than two values)."""
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return round(statistics.fmean(xs), 4), round(se, 4)


if __name__ == "__main__":
    main()
