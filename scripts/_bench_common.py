"""Shared helpers of ``scripts/bench_decode.py`` and ``scripts/bench_mtp.py``.

Benchmark scripts only: regime bookkeeping (stock mlx[cpu] vs OpenBLAS
preloaded), machine-load notes, plain-text tables, JSON output and the
model folders the benchmarks convert once and reuse (under
``/work/bench_out/models`` by default, override with ``MLX_MTP_BENCH_MODELS``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = Path(os.environ.get("MLX_MTP_SHARED_MODELS", "/work/shared/models"))
TARGET_SRC = SHARED_MODELS / "tiny-gemma4-code"
DRAFTER_SRC = SHARED_MODELS / "tiny-gemma4-code-assistant"
MODELS_DIR = Path(os.environ.get("MLX_MTP_BENCH_MODELS", "/work/bench_out/models"))
REGIMES = ("stock", "openblas")


# ---------------------------------------------------------------------------
# regime / environment


def regime_info(label: str) -> Dict[str, Any]:
    """What the process can see about its BLAS regime; warns when ``label`` looks wrong."""
    preload = os.environ.get("LD_PRELOAD", "")
    has_openblas = "openblas" in preload.lower()
    info = {
        "regime": label,
        "LD_PRELOAD": preload or None,
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "openblas_mapped": _openblas_mapped(),
    }
    if label == "openblas" and not has_openblas:
        warn(f"--regime-label openblas but LD_PRELOAD={preload!r} does not name libopenblas")
    if label == "stock" and has_openblas:
        warn(f"--regime-label stock but LD_PRELOAD={preload!r} preloads OpenBLAS")
    return info


def _openblas_mapped() -> Optional[bool]:
    """Whether libopenblas is mapped into this process (Linux only; None if unknown)."""
    try:
        return "openblas" in Path("/proc/self/maps").read_text().lower()
    except OSError:
        return None


def machine_info() -> Dict[str, Any]:
    import mlx.core as mx

    info: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
    }
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:  # pragma: no cover
        pass
    return info


def loadavg() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()[:1]}] {msg}", file=sys.stderr, flush=True)


def fresh() -> None:
    """Between timed runs: collect garbage, drop MLX's buffer cache, reset the peak."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def on_line(points: Dict[int, float]) -> Dict[int, float]:
    """The values of ``points`` (k -> round time) on their least-squares line in k: round
    time is close to linear in k, and each k's own measurement carries its run's noise."""
    from mlx_mtp.controller import centred_line

    mean_k, mean_t, slope = centred_line([(k, t, 1.0) for k, t in points.items()])
    return {k: mean_t + slope * (k - mean_k) for k in points}


def median(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------
# tables / JSON


def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{nd}f}"
    if isinstance(v, (list, tuple)):
        return "/".join(fmt(x, nd) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}:{fmt(x, nd)}" for k, x in v.items())
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], nd: int = 2) -> str:
    """Plain-text table, columns right-aligned (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[fmt(c, nd) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(parts).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Optional[str], data: Dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    tmp.replace(p)
    print(f"wrote {p}", file=sys.stderr)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------
# model folders (converted once, reused by later runs)


def _done(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def converted(src: Path, name: str, *, quantize: bool, dtype: str, q_bits: int = 4) -> Path:
    """``src`` converted with our converter into ``MODELS_DIR/name`` (cached)."""
    from mlx_mtp.convert import convert

    dst = MODELS_DIR / name
    if not _done(dst):
        log(f"converting {src} -> {dst} (quantize={quantize}, dtype={dtype})")
        convert(str(src), str(dst), quantize=quantize, q_bits=q_bits, dtype=dtype, force=True)
    return dst


S, F = "sliding_attention", "full_attention"

# E2B widths (hidden 1536, 8 query heads, 1 KV head, head_dim 256 / global 512, MLP 6144 double-wide on KV-shared
# layers, PLE 256, window 512) with 4 layers (the last two KV-shared) and a 32k vocabulary instead of 35 layers
# and 262k: per-layer cost is E2B's, and a run of both implementations fits in minutes on a 2-core CPU.
E2B_WIDTH = {
    "vocab_size": 32768,
    "hidden_size": 1536,
    "intermediate_size": 6144,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "global_head_dim": 512,
    "layer_types": [S, F, S, F],
    "sliding_window": 512,
    "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 32768,
    "num_kv_shared_layers": 2,
    "use_double_wide_mlp": True,
    "attention_k_eq_v": False,
    "enable_moe_block": False,
    "max_position_embeddings": 32768,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "rope_parameters": {
        S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
}


def e2b_width_hf(seed: int = 0) -> Path:
    """A random-weight float32 ``Gemma4ForCausalLM`` of E2B width saved by transformers (cached).

    Weights follow ``tests/hf_ref._randomize_`` (well-conditioned random init); the tokenizer is the demo's
    (4096 ids, a subset of the 32k vocabulary), which is all the benchmarks need.
    """
    dst = MODELS_DIR / "e2bw4-hf-f32"
    if _done(dst):
        return dst
    log(f"building random E2B-width target in {dst} (transformers, float32)")
    sys.path.insert(0, str(REPO / "tests"))
    import shutil

    import hf_ref  # noqa: E402  (tests/hf_ref.py)
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    hf_ref.patch_transformers()
    torch.manual_seed(seed)
    cfg = Gemma4TextConfig(**E2B_WIDTH)
    with torch.no_grad():
        model = Gemma4ForCausalLM(cfg).to(torch.float32).eval()
        hf_ref._randomize_(
            model.model, seed * 1000 + 17, ple_width=E2B_WIDTH["hidden_size_per_layer_input"]
        )
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TARGET_SRC / f, tmp / f)
    del model
    gc.collect()
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst
