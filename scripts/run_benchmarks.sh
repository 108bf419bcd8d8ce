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
# Note: the E2B-width rows of bench_decode take >15 min per model on the stock CPU wheel;
# pass --quick to bench_decode.py for the demo rows only.
$PY scripts/bench_decode.py --regime-label stock --json "$OUT/decode_stock.json" | tee "$OUT/decode_stock.txt"
LD_PRELOAD=$OB OPENBLAS_NUM_THREADS=1 $PY scripts/bench_decode.py --regime-label openblas --json "$OUT/decode_openblas.json" | tee "$OUT/decode_openblas.txt"
