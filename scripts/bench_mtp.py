"""MTP speculative decoding on the shared trained pair: plain, fixed k = 1..8, and auto.

    python scripts/bench_mtp.py [--regime-label stock|openblas] [--json PATH] [--quick] [--no-hf]

Prompt classes: held-out code (stdlib test files, never trained on), prose (stdlib text
docs) and adversarial (random token ids, continued by sampling at temperature 1, which the
drafter cannot guess; code and prose are greedy and checked against plain output).  For each dtype and
class, every configuration runs on the same prompts, one prompt at a time in turn
(k=1..4, plain, auto, k=5..8; the order alternates), ``--new-tokens`` tokens each, ``--reps`` times
(adversarial runs use a new seed per repetition and prompt, the same for every configuration).

Device-independent figures per row: tokens per target forward (tpf), target forwards per
token (1/tpf), drafter step cost relative to a plain target step (c), and the projected
speedup where verifying k+1 tokens costs about one step (Apple Silicon):
``projected = tpf / (1 + k * c)``.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from _bench_common import (  # noqa: E402
    DRAFTER_SRC,
    TARGET_SRC,
    fresh,
    loadavg,
    log,
    machine_info,
    on_line,
    regime_info,
    table,
    write_json,
)

STDLIB = Path(np.__file__).resolve().parents[4] / "python3.11"
STDLIB = STDLIB if STDLIB.exists() else Path(sys.base_prefix) / "lib" / "python3.11"


def prompts(tok, n_per_class: int):
    rng = np.random.default_rng(0)
    code_files = sorted(glob.glob(str(STDLIB / "test" / "test_*.py")))
    code = []
    for f in rng.choice(code_files, size=n_per_class, replace=False):
        ids = tok.encode(Path(f).read_text(errors="replace"))
        code.append(ids[: int(rng.integers(64, 129))])
    prose_text = (STDLIB / "idlelib" / "NEWS.txt").read_text(errors="replace")
    paras = [p for p in prose_text.split("\n\n") if len(p) > 300]
    prose = [
        tok.encode(paras[int(i)])[:120] for i in rng.choice(len(paras), n_per_class, replace=False)
    ]
    adversarial = [
        [2] + rng.integers(4, 4096, 100).tolist() for _ in range(n_per_class)
    ]  # random ids
    return {"code": code, "prose": prose, "adversarial": adversarial}


def load_pair(dtype: str):
    from mlx_mtp.loading import load

    act = "float32" if dtype == "4bit" else dtype
    target, tok = load(str(TARGET_SRC), dtype=act)
    drafter, _ = load(str(DRAFTER_SRC), dtype=act)
    if (
        dtype == "4bit"
    ):  # 4-bit weights, float32 activations (bf16 ones are 5-9x slower on this CPU)

        def pred(_path, m):
            return hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0

        nn.quantize(target, group_size=64, bits=4, class_predicate=pred)
        nn.quantize(drafter, group_size=64, bits=4, class_predicate=pred)
    mx.eval(target.parameters(), drafter.parameters())
    return target, drafter, tok


def run(target, drafter, ids, n, k, temperature=0.0, seed=0, controller=None):
    """One request: plain decoding (k "plain"), a fixed k, or "auto" (with ``controller``:
    that controller instead of the pair's own).  Returns (tokens, stats)."""
    from mlx_mtp.sampling import Sampler
    from mlx_mtp.speculative import GenerationStats, generate_tokens

    fresh()
    mx.random.seed(seed)
    stats = GenerationStats()
    toks = [
        t
        for t, _ in generate_tokens(
            target,
            ids,
            max_tokens=n,
            sampler=Sampler(temperature),
            stats=stats,
            draft_model=None if k == "plain" else drafter,
            num_draft_tokens=0 if k == "plain" else k,
            controller=controller,
        )
    ]
    return toks, stats


def controller_state(target, drafter) -> dict:
    """What the pair's adaptive controller believes after a request: plain step and round
    times (ms), break-even acceptance, acceptance estimate, re-measure rounds so far."""
    from mlx_mtp.speculative import make_controller

    c = make_controller("auto", target, drafter)
    times = [c.round_time(k) for k in range(c.k_max + 1)]
    return {
        "plain_ms": round(1e3 * times[0], 3),
        "round_ms": [round(1e3 * t, 2) for t in times[1:]],
        "break_even": round(c.break_even_acceptance(times), 3),
        "acceptance": [round(a, 3) for a in c.acceptance()[:4]],
        "remeasures": c.remeasures,
    }


def nbytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def run_order(configs):
    """The order in which one prompt runs the configurations: plain decoding and ``auto``
    next to each other in the middle, the fixed k around them (the deep ones, best on easy
    text, close by).  The goal compares ``auto`` with plain decoding and the best fixed k,
    and this shared machine drifts in speed within seconds: with ``auto`` last and plain
    first, nine runs apart, an ``auto`` that ran every step plain measured 0.78-1.07 of
    plain decoding per prompt (openblas float32 adversarial)."""
    fixed = [k for k in configs if k not in ("plain", "auto")]
    middle = [k for k in ("plain", "auto") if k in configs]
    half = len(fixed) // 2
    return fixed[:half] + middle + fixed[half:]


def bench_dtype(dtype, classes, n, configs, regime, reps):
    target, drafter, _ = load_pair(dtype)
    drafter_bytes = nbytes(drafter)
    # Every configuration runs once greedy and once sampled before timing (allocations of
    # its shapes; for auto, the pair's one-time cost calibration, which a long-lived app
    # also pays only once).
    warm = next(iter(classes.values()))[0]
    for k in configs:
        run(target, drafter, warm, 64, k)
        run(target, drafter, warm, 64, k, 1.0)  # sampled rounds allocate other shapes
    rows = []
    for cls, plist in classes.items():
        acc = {
            k: {
                "time": 0.0,
                "tokens": 0,
                "rounds": 0,
                "gen": 0,
                "stats": [],
                "same": 0,
                "peak": 0,
                "rep_tps": [[0.0, 0] for _ in range(reps)],
                "outs": [],
            }
            for k in configs
        }
        plain_out = {}
        order = run_order(configs)
        for rep in range(reps):
            for pi, ids in enumerate(plist):
                # Alternate the order so drift (thermal, other load) hits every configuration alike.
                for k in order if (rep + pi) % 2 == 0 else order[::-1]:
                    # Greedy continuations of random ids collapse into easy loops; sampling at
                    # temperature 1 keeps the adversarial class unpredictable for the drafter.
                    # Each (rep, prompt) has its own seed, the same for every configuration,
                    # so no configuration keeps one lucky random text across repetitions.
                    temp = 1.0 if cls == "adversarial" else 0.0
                    toks, st = run(target, drafter, ids, n, k, temp, seed=1000 * rep + pi)
                    if k == "plain" and rep == 0:
                        plain_out[pi] = toks
                    a = acc[k]
                    a["time"] += st.generation_time
                    a["tokens"] += st.generation_tokens
                    a["rounds"] += st.rounds
                    a["stats"].append(st)
                    a["rep_tps"][rep][0] += st.generation_time
                    a["rep_tps"][rep][1] += st.generation_tokens
                    a["outs"].append((pi, toks))
                    if k == "auto":
                        a.setdefault("ctrl", []).append(controller_state(target, drafter))
                    a["peak"] = max(a["peak"], st.peak_memory_bytes)
        for a in acc.values():  # greedy classes: the same tokens as plain decoding?
            a["same"] = sum(int(toks == plain_out[pi]) for pi, toks in a["outs"])
        plain_tps = acc["plain"]["tokens"] / acc["plain"]["time"]
        plain_step_ms = 1e3 * acc["plain"]["time"] / max(1, acc["plain"]["rounds"])
        for k in configs:
            a = acc[k]
            sts = a["stats"]
            drafted = sum(s.drafted_tokens for s in sts)
            by_pos = np.zeros(8)
            tried = np.zeros(8)
            for s in sts:
                for i, (d, c) in enumerate(zip(s.drafted_by_position, s.accepted_by_position)):
                    tried[i] += d
                    by_pos[i] += c
            tpf = (a["tokens"] - len(sts)) / max(1, a["rounds"])
            # Drafter cost from split-timed rounds; None where the row drafted but timed none
            # (auto on text it runs plain: its few rounds are not timed).
            timed = [s.draft_step_ms for s in sts if s.timed_draft_steps]
            d_ms = float(np.mean(timed)) if timed else (None if drafted else 0.0)
            c = None if d_ms is None else d_ms / plain_step_ms
            kk = (
                0
                if k == "plain"
                else (
                    np.mean([kk for s in sts for kk, r in s.k_counts.items() for _ in range(r)])
                    if k == "auto"
                    else k
                )
            )
            k_counts = {}
            for s in sts:
                for kk2, r in s.k_counts.items():
                    k_counts[kk2] = k_counts.get(kk2, 0) + r
            tps = a["tokens"] / a["time"]
            rows.append(
                {
                    "regime": regime,
                    "dtype": dtype,
                    "class": cls,
                    "k": k,
                    "tps": tps,
                    "speedup_vs_plain": tps / plain_tps,
                    "tokens_per_target_forward": tpf,
                    "target_forwards_per_token": 1 / tpf if tpf else None,
                    "acceptance_by_position": [
                        round(float(x), 3)
                        for x in (by_pos / np.maximum(tried, 1))[: int(np.count_nonzero(tried))]
                    ],
                    "drafter_step_ms": d_ms,
                    "target_step_ms": plain_step_ms,
                    "drafter_cost_ratio": c,
                    "projected_speedup": (
                        1.0 if k == "plain" else None if c is None else float(tpf / (1 + kk * c))
                    ),
                    "peak_memory_bytes": a["peak"],
                    "drafter_bytes": drafter_bytes,
                    "identical_to_plain": (
                        f"{a['same']}/{len(plist) * reps}"
                        if cls != "adversarial"
                        else "n/a (sampled)"
                    ),
                    "tps_per_rep": [round(tk / tt, 1) for tt, tk in a["rep_tps"]],
                    "k_counts": k_counts if k == "auto" else None,
                    # Each run on its own (prompt order; repetitions follow each other).
                    "per_run": [
                        {"tps": round(s.generation_tps, 1), "k_counts": s.k_counts} for s in sts
                    ],
                    # auto: the controller's beliefs after each run (diagnosing an all-plain run)
                    "controller": a.get("ctrl"),
                }
            )
        log(f"{dtype} {cls}: plain {plain_tps:.1f} tok/s")
    return rows


def hf_rows(classes, n, ks):
    """HF transformers on the same pair and prompts (float32, 1 torch thread)."""
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import hf_ref
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    hf_ref.patch_transformers()
    target = AutoModelForCausalLM.from_pretrained(str(TARGET_SRC), dtype=torch.float32)
    drafter = AutoModelForCausalLM.from_pretrained(str(DRAFTER_SRC), dtype=torch.float32)
    rows = []
    for cls, plist in classes.items():
        for k in ["plain"] + list(ks):
            tokens, tt, tpf_counts = 0, 0.0, []
            for ids in plist:
                kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
                if k != "plain":
                    drafter.generation_config.num_assistant_tokens = k
                    kw["assistant_model"] = drafter
                t0 = time.perf_counter()
                out = target.generate(torch.tensor([ids]), **kw)
                tt += time.perf_counter() - t0
                tokens += out.shape[1] - len(ids)
                if k != "plain":
                    res = hf_ref.hf_assisted_greedy(str(TARGET_SRC), str(DRAFTER_SRC), ids, n, k)
                    tpf_counts.append(res["tokens_per_target_forward"])
            rows.append(
                {
                    "class": cls,
                    "k": k,
                    "hf_tps": tokens / tt,
                    "hf_tokens_per_target_forward": (
                        float(np.mean(tpf_counts)) if tpf_counts else 1.0
                    ),
                }
            )
        log(f"hf {cls} done")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime-label", default="stock", choices=["stock", "openblas"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16,4bit")
    ap.add_argument("--classes", default="code,prose,adversarial")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--reps", type=int, default=1, help="repetitions of every (prompt, configuration) run"
    )
    args = ap.parse_args()
    from mlx_mtp.loading import load

    regime = regime_info(args.regime_label)
    _, tok = load(str(TARGET_SRC))
    n = 32 if args.quick else args.new_tokens
    classes = prompts(tok, 1 if args.quick else args.prompts)
    classes = {c: p for c, p in classes.items() if c in args.classes.split(",")}
    configs = ["plain", 2, 4, "auto"] if args.quick else ["plain", 1, 2, 3, 4, 5, 6, 7, 8, "auto"]
    rows = []
    for dtype in args.dtypes.split(","):
        rows += bench_dtype(
            dtype, classes, n, configs, args.regime_label, 1 if args.quick else args.reps
        )
    heads = [
        "dtype",
        "class",
        "k",
        "tps",
        "speedup_vs_plain",
        "tokens_per_target_forward",
        "drafter_cost_ratio",
        "projected_speedup",
        "identical_to_plain",
        "peak_memory_bytes",
    ]
    print(
        f"regime: {args.regime_label}; greedy, {n} new tokens; projected = tpf / (1 + k*c), c = drafter step / plain step"
    )
    print(table(heads, [[r[h] for h in heads] for r in rows]))
    summary = summarize(rows)
    for line in summary["lines"]:
        print(line)
    hf = [] if args.no_hf else hf_rows(classes, n, [1, 2, 4, 8] if not args.quick else [4])
    if hf:
        print(
            table(
                ["class", "k", "hf_tps", "hf_tokens_per_target_forward"],
                [
                    [r[h] for h in ["class", "k", "hf_tps", "hf_tokens_per_target_forward"]]
                    for r in hf
                ],
            )
        )
    write_json(
        args.json,
        {
            "regime": regime,
            "machine": machine_info(),
            "loadavg": loadavg(),
            "rows": rows,
            "hf": hf,
            "summary": summary,
        },
    )


def smoothed_best(fixed):
    """(k, tok/s) of the best fixed k with round times on their least-squares line in k.

    Each fixed k's run carries its own noise (this machine drifts within seconds), and the
    best of eight noisy runs is biased upward: a k measured lucky (openblas bfloat16 code:
    k = 5 at 2.83 plain steps a round, between k = 4 at 3.08 and k = 6 at 3.54) sets the
    reference.  Round time is close to linear in k, so the line keeps each k's measured
    acceptance (tokens per target forward) and spreads the timing noise over all k."""
    tpf = {r["k"]: r["tokens_per_target_forward"] for r in fixed}
    line = on_line({r["k"]: tpf[r["k"]] / r["tps"] for r in fixed})
    rates = {k: tpf[k] / t for k, t in line.items()}
    k = max(rates, key=rates.get)
    return k, rates[k]


def summarize(rows):
    lines, out = [], []
    for dtype in sorted({r["dtype"] for r in rows}):
        for cls in ("code", "prose", "adversarial"):
            sel = [r for r in rows if r["dtype"] == dtype and r["class"] == cls]
            if not sel:
                continue
            plain = next(r for r in sel if r["k"] == "plain")
            fixed = [r for r in sel if isinstance(r["k"], int)]
            best = max(fixed, key=lambda r: r["tps"])
            auto = next(r for r in sel if r["k"] == "auto")
            ref = max(plain["tps"], best["tps"])
            smooth_k, smooth_tps = smoothed_best(fixed)
            smooth_ref = max(plain["tps"], smooth_tps)
            mem_ok = all(
                r["peak_memory_bytes"] <= 1.02 * (plain["peak_memory_bytes"] + r["drafter_bytes"])
                for r in sel
            )
            # The same ratio within each repetition alone: how much of a 3% gap is noise.
            per_rep = [
                a / max(p, b)
                for a, p, b in zip(auto["tps_per_rep"], plain["tps_per_rep"], best["tps_per_rep"])
            ]
            item = {
                "dtype": dtype,
                "class": cls,
                "best_k": best["k"],
                "best_k_speedup": best["speedup_vs_plain"],
                "auto_speedup": auto["speedup_vs_plain"],
                "auto_vs_best": auto["tps"] / ref,
                "auto_vs_best_per_rep": [round(x, 3) for x in per_rep],
                "smoothed_best_k": smooth_k,
                "auto_vs_smoothed_best": auto["tps"] / smooth_ref,
                "memory_ok": mem_ok,
            }
            out.append(item)
            lines.append(
                f"{dtype:9s} {cls:11s} best k={best['k']} x{best['speedup_vs_plain']:.2f}  "
                f"auto x{auto['speedup_vs_plain']:.2f} = {auto['tps'] / ref:.2f} of max(plain, best) "
                f"(per rep {', '.join(f'{x:.2f}' for x in per_rep)}; "
                f"{auto['tps'] / smooth_ref:.2f} of max(plain, smoothed best k={smooth_k}))  "
                f"memory ok: {mem_ok}"
            )
    return {"items": out, "lines": lines}


if __name__ == "__main__":
    main()
