#!/usr/bin/env python
"""Convert a Gemma 4 target or MTP assistant drafter to the MLX (mlx-community) layout.

A thin wrapper around ``mlx_mtp.convert.main`` (same as ``python -m mlx_mtp.convert``)::

    python convert/convert.py --hf-path SRC --mlx-path DST [-q --q-bits 4 --q-group-size 64]
                              [--dtype float32|float16|bfloat16] [--force] [--expect target|drafter]

Run it from anywhere: the repository root is put on ``sys.path`` when ``mlx_mtp`` is not installed.
This folder is not a package; import the file by path if needed.
"""

import sys
from pathlib import Path

try:
    import mlx_mtp.convert as _convert
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mlx_mtp.convert as _convert

main = _convert.main
setup_arg_parser = _convert.setup_arg_parser

if __name__ == "__main__":
    sys.exit(main())
