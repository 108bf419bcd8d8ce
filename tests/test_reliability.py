"""Nothing lost, nothing left broken: interrupted streams, Ctrl-C in the CLI, long runs.

* Closing a ``stream_generate`` generator in the middle of an MTP round, or a ``KeyboardInterrupt``
  raised inside the decoding loop (after the verify forward, before the rollback), leaves the model
  and the drafter consistent: the next call gives exactly what a freshly loaded pair gives.
* ``python -m mlx_mtp.generate`` killed with SIGINT (while decoding with the drafter, or while
  loading) exits 130 with no traceback and keeps the text it printed, which is a prefix of the
  full output.
* ``scripts/long_run.py`` shortened: MTP and plain decoding agree token for token long after the
  sliding window wrapped, and memory grows only by the full-attention KV cache.

Fixtures: the bundled demo pair (float32), loaded twice (a "fresh process" stand-in).
"""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("PYTHONWARNINGS", None)
    return env


def _load_pair():
    from mlx_mtp import load
    from mlx_mtp.demo import demo_draft_path, demo_model_path

    model, tok = load(str(demo_model_path()))
    drafter, _ = load(str(demo_draft_path()))
    return model, tok, drafter


@pytest.fixture(scope="module")
def pair():
    """The pair the tests interrupt and reuse."""
    return _load_pair()


@pytest.fixture(scope="module")
def fresh():
    """A second, independent instance of the pair: what a fresh process computes."""
    return _load_pair()


def _run(model, tok, drafter, **kw):
    from mlx_mtp import stream_generate

    return [
        (r.token, r.from_draft)
        for r in stream_generate(model, tok, PROMPT, draft_model=drafter, **kw)
    ]


def _tokens(run):
    return [t for t, _ in run]


def _mid_round_cut(flags, min_run=4, cut=3):
    """Index after which to stop so that a round with >= ``min_run`` accepted drafts is cut after
    ``cut`` of them (its remaining drafts and its bonus token are still undelivered)."""
    streak = 0
    for i, from_draft in enumerate(flags):
        streak = streak + 1 if from_draft else 0
        if streak == cut and all(flags[i + 1 : i + 1 + min_run - cut]):
            return i + 1
    return None


# ---------------------------------------------------------------------------------------------
# interrupted streams (API)


def test_close_in_the_middle_of_a_round(pair, fresh):
    model, tok, drafter = pair
    kw = dict(max_tokens=64, num_draft_tokens=4)
    reference = _run(*fresh, **kw)
    flags = [f for _, f in reference]
    stop = _mid_round_cut(flags)
    assert stop is not None, f"no round with 4 accepted drafts in {flags}"

    from mlx_mtp import stream_generate

    gen = stream_generate(model, tok, PROMPT, draft_model=drafter, **kw)
    head = [(next(gen).token) for _ in range(stop)]
    gen.close()  # 3 of the round's 4 accepted drafts delivered; draft 4 and the bonus are not
    assert head == _tokens(reference)[:stop]
    assert _run(model, tok, drafter, **kw) == reference  # same tokens, same rounds
    # and the adaptive path (its controller is shared by the pair across calls) stays lossless
    greedy_auto = _tokens(_run(model, tok, drafter, max_tokens=64))
    assert greedy_auto == _tokens(reference)


def test_close_mid_round_then_seeded_sampling_matches_fresh(pair, fresh):
    from mlx_mtp import make_sampler, stream_generate

    model, tok, drafter = pair
    kw = dict(max_tokens=40, num_draft_tokens=3, sampler=make_sampler(temp=0.8, top_p=0.95))
    reference = _run(*fresh, seed=11, **kw)
    gen = stream_generate(model, tok, PROMPT, draft_model=drafter, seed=5, **kw)
    for _ in range(7):
        next(gen)
    gen.close()
    assert _run(model, tok, drafter, seed=11, **kw) == reference


@pytest.mark.parametrize("where", ["verify", "draft", "consumer"])
def test_keyboard_interrupt_inside_the_loop(pair, fresh, monkeypatch, where):
    """Ctrl-C surfacing (a) after the verify forward, before the rollback of rejected drafts,
    (b) while drafting, (c) in the caller's loop body: the next call is exactly a fresh one."""
    import mlx_mtp.speculative as spec
    from mlx_mtp import stream_generate

    model, tok, drafter = pair
    kw = dict(max_tokens=48, num_draft_tokens=4)
    reference = _run(*fresh, **kw)
    calls = []

    if where == "verify":
        real = spec.trim_cache

        def trim(cache, n):
            calls.append(n)
            if len(calls) == 5:
                raise KeyboardInterrupt  # the target cache still holds this round's drafts
            return real(cache, n)

        monkeypatch.setattr(spec, "trim_cache", trim)
    elif where == "draft":
        real_draft = spec.draft

        def draft(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return real_draft(*args, **kwargs)

        monkeypatch.setattr(spec, "draft", draft)

    got = []
    with pytest.raises(KeyboardInterrupt):
        for r in stream_generate(model, tok, PROMPT, draft_model=drafter, **kw):
            got.append(r.token)
            if where == "consumer" and len(got) == 10:
                raise KeyboardInterrupt
    monkeypatch.undo()
    assert got and got == _tokens(reference)[: len(got)]
    assert _run(model, tok, drafter, **kw) == reference
    assert _run(model, tok, None, max_tokens=48) == [(t, False) for t in _tokens(reference)]


# ---------------------------------------------------------------------------------------------
# Ctrl-C in the CLI


def _start_cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_mtp.generate", *args],
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_sigint_while_decoding_with_mtp_keeps_the_text(pair):
    from mlx_mtp import generate

    model, tok, drafter = pair
    proc = _start_cli("--prompt", PROMPT, "--max-tokens", "3000", "--num-draft-tokens", "3")
    got = b""
    deadline = time.monotonic() + 240
    while len(got) < 60 and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            got += chunk
    assert len(got) >= 60, "no streamed text before the deadline"
    proc.send_signal(signal.SIGINT)
    rest, err = _finish(proc)
    err = err.decode("utf-8", "replace")
    printed = (got + rest).decode("utf-8")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "[interrupted]" in err, err
    assert "Generation:" not in err  # no statistics after an interrupt
    assert printed.endswith("\n")
    printed = printed[:-1]  # the newline written on interrupt
    # What was printed is exactly the start of the full output (same greedy tokens).
    reference = generate(model, tok, PROMPT, max_tokens=400, draft_model=drafter)
    assert len(printed) < len(reference), "interrupt came too late to compare"
    assert reference.startswith(printed), (printed, reference[: len(printed) + 20])


def test_cli_sigint_while_loading_exits_130():
    proc = _start_cli("--prompt", PROMPT, "--max-tokens", "8")
    time.sleep(1.0)  # inside the imports / model loading
    proc.send_signal(signal.SIGINT)
    _, err = _finish(proc)
    err = err.decode("utf-8", "replace")
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (a very fast machine)")
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# long runs (the same function as scripts/long_run.py, shortened)


def _long_run_module():
    spec = importlib.util.spec_from_file_location(
        "mlx_mtp_long_run", REPO / "scripts" / "long_run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_long_run_short():
    """800 greedy tokens (the demo's sliding window is 128: it wraps 6 times) with k = 4."""
    lr = _long_run_module()
    report = lr.run_long(800, 250, num_draft_tokens=4)
    text = lr.format_report(report)
    assert report["ok"], text
    assert report["first_difference"] is None
    for run in report["runs"].values():
        a, b = run["snapshots"]["checkpoint"], run["snapshots"]["end"]
        assert a["sliding_nbytes"] == b["sliding_nbytes"] > 0
        assert 0 < run["full_kv_growth"] <= report["full_kv_bytes_per_token"] * (550 + 256)
    mtp = report["runs"]["mtp"]
    assert mtp["k_counts"].get(4, 0) > 50 and mtp["mean_tokens_per_forward"] > 1.5, text


def test_long_run_flags_a_leak(monkeypatch):
    """The memory check is not vacuous: a buffer kept per generated token is reported."""
    lr = _long_run_module()
    import mlx.core as mx

    import mlx_mtp.speculative as spec

    leak = []
    real = spec.RoundState

    def leaky(token, hidden):
        leak.append(mx.zeros((1024,), dtype=mx.float32) + 1)  # 4 KiB per round
        mx.eval(leak[-1])
        return real(token, hidden)

    monkeypatch.setattr(spec, "RoundState", leaky)
    report = lr.run_long(300, 100, num_draft_tokens=2)
    assert not report["ok"]
    assert any("active memory grew" in p for p in report["problems"]), report["problems"]
