#!/usr/bin/env bash
# Both CPU regimes of both benchmarks; results in ${OUT:-/work/bench_out}.
# stock: the mlx[cpu] wheel as installed. openblas: Debian's OpenBLAS preloaded
# (apt-get install libopenblas0-pthread), one BLAS thread: the regime closest to Metal.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/work/bench_out}
PY=${PY:-python}
OB=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
mkdir -p "$OUT"
$PY scripts/bench_mtp.py --regime-label stock --json "$OUT/mtp_stock.json" "$@" | tee "$OUT/mtp_stock.txt"
LD_PRELOAD=$OB OPENBLAS_NUM_THREADS=1 $PY scripts/bench_mtp.py --regime-label openblas --json "$OUT/mtp_openblas.json" "$@" | tee "$OUT/mtp_openblas.txt"
# The adaptive controller replayed on both runs' cost curves without timing noise (records the
# drafts' traces first, about a minute).
$PY scripts/replay_controller.py --costs "$OUT/mtp_stock.json" "$OUT/mtp_openblas.json" \
    --traces "$OUT/traces.json" --json "$OUT/replay.json" | tee "$OUT/replay.txt"
# bench_decode: about 6 minutes per regime (E2B-width rows use a 256-token prompt and 64 new
# tokens); pass --quick for the demo rows only.
$PY scripts/bench_decode.py --regime-label stock --json "$OUT/decode_stock.json" | tee "$OUT/decode_stock.txt"
LD_PRELOAD=$OB OPENBLAS_NUM_THREADS=1 $PY scripts/bench_decode.py --regime-label openblas --json "$OUT/decode_openblas.json" | tee "$OUT/decode_openblas.txt"
