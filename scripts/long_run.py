#!/usr/bin/env python
"""Long-run stability: N greedy tokens with MTP and with plain decoding, same output, bounded memory.

    python scripts/long_run.py [--tokens 10000] [--checkpoint 2000] [--json PATH]
                               [--model DIR --draft-model DIR] [--dtype float32]
                               [--num-draft-tokens 4|auto]

Runs the bundled demo pair by default (float32; its sliding window is 128 tokens, so the sliding
caches wrap around dozens of times).  Both runs go through ``mlx_mtp.speculative.generate_tokens``
with ``stop_ids`` empty, so nothing ends them early: exactly N tokens each.  At the checkpoint and
at N it records

* MLX active memory and peak memory (``mx.get_active_memory`` / ``mx.get_peak_memory``; the peak
  is reset at the start of each run),
* the bytes held by the sliding-window caches and by the full-attention caches (``nbytes``).

It prints a table and exits with 1 when

* the MTP tokens differ from the plain tokens anywhere (the first difference is reported),
* the sliding caches' bytes changed between the checkpoint and N (they must be bounded),
* active memory grew between the checkpoint and N by more than the full-attention KV growth:
  ``bytes per token`` (computed from the config: KV-owning full layers x KV heads x head dim x 2
  x itemsize) times the tokens added, plus one allocation block of the full cache (it grows in
  blocks of 256 tokens), plus 2%.

``run_long`` is the same check as a function (the tests run a shortened version of it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402

TOLERANCE = 0.02  # relative slack on the memory allowance


def full_kv_bytes_per_token(model, dtype: mx.Dtype) -> int:
    """Bytes the full-attention caches add per token, from the config alone."""
    from mlx_mtp.models.gemma4 import FULL

    cfg = model.args
    owners = [i for i in range(cfg.first_shared) if cfg.layer_types[i] == FULL]
    per_layer = cfg.kv_heads_of(FULL) * cfg.head_dim_of(FULL) * 2 * dtype.size  # K and V
    return len(owners) * per_layer


@contextlib.contextmanager
def capture_caches(model, into: List[list]):
    """Record the cache list ``generate_tokens`` builds (``model.make_cache`` wrapped)."""
    original = model.make_cache

    def make_cache(*args, **kwargs):
        cache = original(*args, **kwargs)
        into.append(cache)
        return cache

    object.__setattr__(model, "make_cache", make_cache)
    try:
        yield into
    finally:
        object.__delattr__(model, "make_cache")


def _measure(cache: list, produced: int) -> Dict[str, int]:
    from mlx_mtp.cache import KVCache, SlidingKVCache

    mx.synchronize()
    return {
        "tokens": produced,
        "cache_offset": int(cache[0].offset) if cache else 0,
        "active_bytes": int(mx.get_active_memory()),
        "peak_bytes": int(mx.get_peak_memory()),
        "sliding_nbytes": sum(c.nbytes for c in cache if isinstance(c, SlidingKVCache)),
        "full_nbytes": sum(c.nbytes for c in cache if isinstance(c, KVCache)),
    }


def _one_run(model, ids, tokens, checkpoint, draft_model, num_draft_tokens) -> Dict[str, Any]:
    from mlx_mtp.sampling import GREEDY
    from mlx_mtp.speculative import GenerationStats, generate_tokens

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    caches: List[list] = []
    out: List[int] = []
    snaps: Dict[str, Dict[str, int]] = {}
    stats = GenerationStats()
    tic = time.perf_counter()
    with capture_caches(model, caches):
        stream = generate_tokens(
            model,
            ids,
            max_tokens=tokens,
            sampler=GREEDY,
            draft_model=draft_model,
            num_draft_tokens=num_draft_tokens if draft_model is not None else "auto",
            stop_ids=set(),  # nothing ends the run early
            stats=stats,
        )
        for token, _ in stream:
            out.append(token)
            if len(out) == checkpoint:
                snaps["checkpoint"] = _measure(caches[0], len(out))
            if len(out) == tokens:
                snaps["end"] = _measure(caches[0], len(out))
    seconds = time.perf_counter() - tic
    return {
        "tokens": out,
        "seconds": seconds,
        "tokens_per_sec": len(out) / seconds if seconds else 0.0,
        "snapshots": snaps,
        "mean_tokens_per_forward": stats.mean_tokens_per_forward,
        "acceptance_rate": stats.acceptance_rate,
        "k_counts": dict(sorted(stats.k_counts.items())) if draft_model is not None else {},
    }


def run_long(
    tokens: int = 10000,
    checkpoint: int = 2000,
    *,
    model_path: Optional[str] = None,
    draft_path: Optional[str] = None,
    dtype: Optional[str] = "float32",
    num_draft_tokens: Union[int, str] = 4,
    prompt: Optional[str] = None,
) -> Dict[str, Any]:
    """Run plain and MTP greedy decoding for ``tokens`` tokens; returns a report with ``ok``."""
    from mlx_mtp.cache import _STEP as ALLOC_BLOCK
    from mlx_mtp.demo import DEMO_PROMPT, demo_draft_path, demo_model_path
    from mlx_mtp.generate import encode_prompt
    from mlx_mtp.loading import load

    if not 0 < checkpoint < tokens:
        raise ValueError(f"need 0 < checkpoint < tokens, got {checkpoint} and {tokens}")
    model, tokenizer = load(str(model_path or demo_model_path()), dtype=dtype)
    drafter, _ = load(str(draft_path or demo_draft_path()), dtype=dtype)
    ids = encode_prompt(tokenizer, prompt or DEMO_PROMPT)
    context = model.args.max_position_embeddings
    if len(ids) + tokens > context:
        # The check is about memory, not about quality: RoPE extrapolates past the context.
        note = f"{len(ids) + tokens} tokens exceed the model's context ({context})"
    else:
        note = ""
    act_dtype = model.embed(mx.array([ids[:1]])).dtype  # the dtype the caches store
    per_token = full_kv_bytes_per_token(model, act_dtype)

    runs = {
        "plain": _one_run(model, ids, tokens, checkpoint, None, num_draft_tokens),
        "mtp": _one_run(model, ids, tokens, checkpoint, drafter, num_draft_tokens),
    }
    problems: List[str] = []
    a, b = runs["plain"]["tokens"], runs["mtp"]["tokens"]
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if len(a) != tokens or len(b) != tokens:
        problems.append(f"runs ended early: plain {len(a)}, mtp {len(b)} of {tokens} tokens")
    if first_diff is not None:
        problems.append(
            f"MTP output differs from plain decoding at token {first_diff}: "
            f"{a[first_diff]} vs {b[first_diff]}"
        )
    added = tokens - checkpoint
    allowance = math.floor(per_token * (added + ALLOC_BLOCK) * (1 + TOLERANCE))
    for name, run in runs.items():
        cp, end = run["snapshots"]["checkpoint"], run["snapshots"]["end"]
        run["active_growth"] = end["active_bytes"] - cp["active_bytes"]
        run["peak_growth"] = end["peak_bytes"] - cp["peak_bytes"]
        run["full_kv_growth"] = end["full_nbytes"] - cp["full_nbytes"]
        if end["sliding_nbytes"] != cp["sliding_nbytes"]:
            problems.append(
                f"{name}: sliding caches grew from {cp['sliding_nbytes']} to "
                f"{end['sliding_nbytes']} bytes"
            )
        if run["active_growth"] > allowance:
            problems.append(
                f"{name}: active memory grew by {run['active_growth']} bytes between token "
                f"{checkpoint} and {tokens}; the full-attention KV allows {allowance} "
                f"({per_token} B/token x ({added} + {ALLOC_BLOCK}) + {TOLERANCE:.0%})"
            )
        if end["full_nbytes"] > per_token * (end["cache_offset"] + 2 * ALLOC_BLOCK):
            problems.append(
                f"{name}: the full-attention caches hold {end['full_nbytes']} bytes for "
                f"{end['cache_offset']} tokens ({per_token} B/token)"
            )
    for run in runs.values():
        run["tokens_sha1"] = hashlib.sha1(str(run.pop("tokens")).encode()).hexdigest()
    return {
        "ok": not problems,
        "problems": problems,
        "tokens": tokens,
        "checkpoint": checkpoint,
        "prompt_tokens": len(ids),
        "dtype": str(act_dtype),
        "full_kv_bytes_per_token": per_token,
        "allocation_block_tokens": ALLOC_BLOCK,
        "active_growth_allowance": allowance,
        "sliding_window": model.args.sliding_window,
        "first_difference": first_diff,
        "note": note,
        "runs": runs,
    }


def format_report(report: Dict[str, Any]) -> str:
    mib = 1 / 2**20
    cp, n = report["checkpoint"], report["tokens"]
    lines = [
        f"{n} greedy tokens, prompt {report['prompt_tokens']} tokens, {report['dtype']}, "
        f"sliding window {report['sliding_window']}; full-attention KV "
        f"{report['full_kv_bytes_per_token']} B/token; active-memory growth allowed "
        f"{report['active_growth_allowance'] * mib:.3f} MiB",
        "",
        f"| run | tok/s | active MiB @{cp} | @{n} | peak MiB @{cp} | @{n} | sliding KiB @{cp} | "
        f"@{n} | full KV MiB @{cp} | @{n} | active growth MiB | full KV growth MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        a, b = run["snapshots"]["checkpoint"], run["snapshots"]["end"]
        lines.append(
            f"| {name} | {run['tokens_per_sec']:.1f} | {a['active_bytes'] * mib:.2f} | "
            f"{b['active_bytes'] * mib:.2f} | {a['peak_bytes'] * mib:.2f} | "
            f"{b['peak_bytes'] * mib:.2f} | {a['sliding_nbytes'] / 1024:.1f} | "
            f"{b['sliding_nbytes'] / 1024:.1f} | {a['full_nbytes'] * mib:.3f} | "
            f"{b['full_nbytes'] * mib:.3f} | {run['active_growth'] * mib:.3f} | "
            f"{run['full_kv_growth'] * mib:.3f} |"
        )
    mtp = report["runs"]["mtp"]
    lines += [
        "",
        f"MTP: mean tokens/target forward {mtp['mean_tokens_per_forward']:.2f}, acceptance "
        f"{100 * mtp['acceptance_rate']:.1f}%, rounds per k {mtp['k_counts']}",
        "outputs identical"
        if report["first_difference"] is None
        else f"outputs DIFFER from token {report['first_difference']}",
    ]
    if report["note"]:
        lines.append(f"note: {report['note']}")
    lines.append("OK" if report["ok"] else "FAILED: " + "; ".join(report["problems"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=10000)
    p.add_argument("--checkpoint", type=int, default=2000)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--model", default=None, help="target (default: the bundled demo)")
    p.add_argument("--draft-model", default=None, help="drafter (default: the bundled demo's)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16, bfloat16")
    p.add_argument(
        "--num-draft-tokens",
        default="4",
        help="drafts per round (default 4: every round is speculative, so rollback runs all the "
        "time; 'auto' lets the controller choose, and on a slow CPU it mostly picks plain steps)",
    )
    args = p.parse_args(argv)
    k = args.num_draft_tokens
    report = run_long(
        args.tokens,
        args.checkpoint,
        model_path=args.model,
        draft_path=args.draft_model,
        dtype=args.dtype,
        num_draft_tokens=k if k == "auto" else int(k),
    )
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
