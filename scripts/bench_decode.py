"""Plain decoding: mlx-mtp vs mlx-lm's own Gemma 4 on the same converted checkpoints.

    python scripts/bench_decode.py [--regime-label stock|openblas] [--json PATH] [--quick]

Models: the bundled demo target (4-bit with float32 and with bf16 activations, bf16) and a
random E2B-width target (hidden 1536, 4 layers, 32k vocab; 4-bit and bf16), each converted
once with our converter.  For every model, ours and mlx-lm's run alternately in one process;
the table shows medians over ``--reps`` of prefill tok/s and decode tok/s (demo: 512-token
prompt, 128 new tokens; E2B-width: 256 and 64, so a run fits in minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from _bench_common import (  # noqa: E402
    TARGET_SRC,
    converted,
    e2b_width_hf,
    fresh,
    loadavg,
    log,
    machine_info,
    median,
    regime_info,
    table,
    write_json,
)


def models(quick: bool):
    """(name, folder, prompt tokens, new tokens)."""
    # (name, source, folder, quantize, activation dtype, prompt tokens, new tokens)
    specs = [
        ("demo 4-bit (f32 act)", TARGET_SRC, "demo-4bit-f32", True, "float32", 512, 128),
        ("demo 4-bit (bf16 act)", TARGET_SRC, "demo-4bit", True, "bfloat16", 512, 128),
        ("demo bf16", TARGET_SRC, "demo-bf16", False, "bfloat16", 512, 128),
    ]
    if not quick:
        src = e2b_width_hf()
        specs += [
            ("E2B-width 4-bit (f32 act)", src, "e2bw4-4bit-f32", True, "float32", 256, 64),
            ("E2B-width bf16", src, "e2bw4-bf16", False, "bfloat16", 256, 64),
        ]
    return [
        (name, converted(source, folder, quantize=quantize, dtype=dtype), prompt, new)
        for name, source, folder, quantize, dtype, prompt, new in specs
    ]


def run_ours(model, ids, n):
    from mlx_mtp.sampling import Sampler
    from mlx_mtp.speculative import GenerationStats, generate_tokens

    fresh()
    stats = GenerationStats()
    for _ in generate_tokens(model, ids, max_tokens=n, sampler=Sampler(), stats=stats):
        pass
    return stats.prompt_tps, stats.generation_tps


def run_mlx_lm(model, ids, n):
    from mlx_lm.generate import generate_step

    fresh()
    tic = time.perf_counter()
    for i, (tok, _) in enumerate(generate_step(mx.array(ids), model, max_tokens=n)):
        if i == 0:
            mx.eval(tok)
            first = time.perf_counter()
    done = time.perf_counter()
    return len(ids) / (first - tic), (n - 1) / (done - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime-label", default="stock", choices=["stock", "openblas"])
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--quick", action="store_true", help="demo rows only, 128-token prompt, 32 new tokens"
    )
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import mlx_lm

    from mlx_mtp.loading import load

    regime = regime_info(args.regime_label)
    rows = []
    for name, folder, prompt_len, n in models(args.quick):
        if args.quick:
            prompt_len, n = 128, 32
        ids = [2] + np.random.default_rng(0).integers(4, 4096, prompt_len - 1).tolist()
        log(f"{name}: {folder} (prompt {prompt_len}, {n} new tokens, {args.reps} reps)")
        ours, _ = load(str(folder))
        theirs, _ = mlx_lm.load(str(folder))
        run_ours(ours, ids, 8)
        run_mlx_lm(theirs, ids, 8)  # warm-up both
        o, t = [], []
        for rep in range(args.reps):
            # Alternate which implementation goes first, so neither always runs on a warmer machine.
            if rep % 2 == 0:
                o.append(run_ours(ours, ids, n))
                t.append(run_mlx_lm(theirs, ids, n))
            else:
                t.append(run_mlx_lm(theirs, ids, n))
                o.append(run_ours(ours, ids, n))
        row = {
            "model": name,
            "prompt_tokens": prompt_len,
            "new_tokens": n,
            "reps": args.reps,
            "ours_prefill_tps": median(x[0] for x in o),
            "mlx_lm_prefill_tps": median(x[0] for x in t),
            "ours_decode_tps": median(x[1] for x in o),
            "mlx_lm_decode_tps": median(x[1] for x in t),
        }
        row["decode_ratio"] = row["ours_decode_tps"] / row["mlx_lm_decode_tps"]
        row["prefill_ratio"] = row["ours_prefill_tps"] / row["mlx_lm_prefill_tps"]
        rows.append(row)
        log(f"  prefill x{row['prefill_ratio']:.2f}, decode x{row['decode_ratio']:.2f}")
        del ours, theirs
    heads = [
        "model",
        "prompt_tokens",
        "new_tokens",
        "ours_prefill_tps",
        "mlx_lm_prefill_tps",
        "prefill_ratio",
        "ours_decode_tps",
        "mlx_lm_decode_tps",
        "decode_ratio",
    ]
    print(
        f"regime: {args.regime_label}; medians of {args.reps} alternating runs per implementation"
    )
    print(table(heads, [[r[h] for h in heads] for r in rows], nd=2))
    write_json(
        args.json, {"regime": regime, "machine": machine_info(), "loadavg": loadavg(), "rows": rows}
    )


if __name__ == "__main__":
    main()
