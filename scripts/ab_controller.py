"""A/B of the adaptive controller: this checkout's against one from another git revision.

Both run in one process on the shared trained pair, with plain decoding alongside, each
prompt running the three in alternating order (this machine drifts in speed within
seconds).  Each controller keeps its own state across requests, as in a long-lived app.
Prints one JSON line per prompt and a summary per class; writes the lines as JSON.

    PYTHONPATH=. python scripts/ab_controller.py --rev ec8d328 --dtype 4bit \\
        --classes code,prose,adversarial --reps 2 --json ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_mtp as B  # noqa: E402
from _bench_common import write_json  # noqa: E402

from mlx_mtp.controller import AdaptiveController  # noqa: E402
from mlx_mtp.loading import load  # noqa: E402


def controller_at(rev: str):
    """``AdaptiveController`` as of git revision ``rev`` (the module is self-contained)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:mlx_mtp/controller.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "controller_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("controller_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    old = module.AdaptiveController
    if "chances" in inspect.signature(old.observe).parameters:
        return old

    class WithoutChances(old):
        """A revision before rounds reported sampled drafts' pass probabilities."""

        def observe(self, k, accepted, chances=None):
            super().observe(k, accepted)

    return WithoutChances


def run(target, drafter, ids, n, ctrl, temperature, seed):
    """One request: plain decoding (``ctrl`` None) or ``auto`` with the given controller."""
    k = "plain" if ctrl is None else "auto"
    return B.run(target, drafter, ids, n, k, temperature, seed, controller=ctrl)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision of the other controller")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "4bit"])
    ap.add_argument("--classes", default="code,prose,adversarial")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    _, tok = load(str(B.TARGET_SRC))
    target, drafter, _ = B.load_pair(args.dtype)
    classes = B.prompts(tok, 6)
    ctrls = {"new": AdaptiveController(), "old": controller_at(args.rev)()}
    warm = classes["code"][0]
    for c in ctrls.values():  # calibration, in both sampling modes
        run(target, drafter, warm, 64, c, 0.0, 0)
        run(target, drafter, warm, 64, c, 1.0, 0)
    run(target, drafter, warm, 64, None, 0.0, 0)
    lines = []
    for cls in args.classes.split(","):
        temp = 1.0 if cls == "adversarial" else 0.0
        total = {k: [0.0, 0] for k in ("plain", "new", "old")}
        for rep in range(args.reps):
            for pi, ids in enumerate(classes[cls]):
                order = ["plain", "new", "old"] if (rep + pi) % 2 == 0 else ["old", "new", "plain"]
                line = {"class": cls, "rep": rep, "prompt": pi}
                for name in order:
                    st = run(
                        target,
                        drafter,
                        ids,
                        args.new_tokens,
                        ctrls.get(name),
                        temp,
                        1000 * rep + pi,
                    )
                    total[name][0] += st.generation_time
                    total[name][1] += st.generation_tokens
                    line[name] = round(st.generation_tps, 1)
                    if name != "plain":
                        line[f"{name}_k_counts"] = st.k_counts
                print(json.dumps(line), flush=True)
                lines.append(line)
        tps = {k: t[1] / t[0] for k, t in total.items()}
        new, old = tps["new"] / tps["plain"], tps["old"] / tps["plain"]
        print(
            f"{args.dtype} {cls}: plain {tps['plain']:.1f} tok/s, new {new:.3f} of plain,"
            f" old ({args.rev}) {old:.3f}",
            flush=True,
        )
    write_json(args.json, {"rev": args.rev, "dtype": args.dtype, "runs": lines})


if __name__ == "__main__":
    main()
