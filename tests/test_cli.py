"""End-to-end tests of ``python -m mlx_mtp.generate`` and of the generate API.

The CLI runs in subprocesses from the repository root, as a user would; the
API tests load the tiny fixture pair of ``../shared/models`` (HF layout) once.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
TARGET = SHARED / "tiny-gemma4-code"
DRAFTER = SHARED / "tiny-gemma4-code-assistant"
TARGET_REL = "../shared/models/tiny-gemma4-code"  # as a user types it, from the repo root
CONTEXT = 4096  # max_position_embeddings of the fixture

needs_shared = pytest.mark.skipif(
    not (TARGET / "config.json").is_file(), reason="../shared/models fixture missing"
)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["HF_HUB_OFFLINE"] = "1"  # never touch the network
    env.pop("PYTHONWARNINGS", None)
    return env


def run_cli(
    *args: str, stdin: bytes | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_mtp.generate", *args],
        cwd=REPO,
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=_env(),
        timeout=timeout,
    )


def text(p: subprocess.CompletedProcess) -> tuple[str, str]:
    return p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def assert_ok(p: subprocess.CompletedProcess) -> tuple[str, str]:
    out, err = text(p)
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    assert "Warning" not in err, err  # e.g. runpy's double-import RuntimeWarning
    return out, err


def assert_stats(err: str, *, mtp: bool) -> None:
    lines = err.splitlines()
    assert any(line.startswith("Prompt: ") and "tokens-per-sec" in line for line in lines), err
    assert any(line.startswith("Generation: ") and "tokens-per-sec" in line for line in lines), err
    assert any(line.startswith("Peak memory: ") and line.endswith(" GB") for line in lines), err
    assert any(line.startswith("MTP: ") for line in lines) == mtp, err


def assert_user_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    out, err = text(p)
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    for needle in needles:
        assert needle.lower() in error_lines[0].lower(), error_lines[0]
    return error_lines[0]


# ---------------------------------------------------------------------------
# CLI, working runs


def test_demo_default_runs_with_drafter():
    from mlx_mtp.demo import demo_draft_path, demo_model_path

    assert (demo_model_path() / "config.json").is_file(), "bundled demo target missing"
    assert (demo_draft_path() / "config.json").is_file(), "bundled demo drafter missing"
    out, err = assert_ok(run_cli("--prompt", "def fibonacci(n):", "--max-tokens", "48"))
    assert out.strip(), "no text generated"
    banner = [line for line in err.splitlines() if "bundled demo" in line]
    assert len(banner) == 1, err
    assert "--model" in banner[0] and "--draft-model" in banner[0]
    assert_stats(err, mtp=True)
    assert "Generation: 48 tokens" in err or "Generation: " in err


def test_demo_no_mtp():
    out, err = assert_ok(run_cli("--prompt", "import os\n", "--max-tokens", "24", "--no-mtp"))
    assert out.strip()
    assert sum("bundled demo" in line for line in err.splitlines()) == 1
    assert_stats(err, mtp=False)


@needs_shared
def test_shared_hf_folder_with_and_without_drafter():
    # HF layout (bf16 safetensors as transformers writes them), relative path from the repo.
    out_plain, err = assert_ok(
        run_cli("--model", TARGET_REL, "--prompt", "def fibonacci(n):", "--max-tokens", "32")
    )
    assert out_plain.strip()
    assert "bundled demo" not in err
    assert_stats(err, mtp=False)
    out_mtp, err = assert_ok(
        run_cli(
            "--model",
            TARGET_REL,
            "--draft-model",
            "../shared/models/tiny-gemma4-code-assistant",
            "--num-draft-tokens",
            "3",
            "--prompt",
            "def fibonacci(n):",
            "--max-tokens",
            "32",
        )
    )
    assert_stats(err, mtp=True)
    assert "MTP: k=3" in err
    assert out_mtp.strip()


@needs_shared
def test_prompt_from_stdin():
    out, err = assert_ok(
        run_cli("--model", TARGET_REL, "--prompt", "-", "--max-tokens", "16", stdin=b"import sys\n")
    )
    assert out.strip()
    assert "Prompt: " in err


@needs_shared
def test_quiet_prints_only_text():
    p = run_cli("--model", TARGET_REL, "--prompt", "import os\n", "--max-tokens", "8", "--quiet")
    out, err = assert_ok(p)
    assert out.strip()
    assert err.strip() == "", err


# ---------------------------------------------------------------------------
# CLI, user errors: exit 2, exactly one "error:" line, no traceback


def test_missing_model_path():
    assert_user_error(
        run_cli("--model", "/nonexistent/model/folder", "--prompt", "x"), "does not exist"
    )


def test_empty_prompt():
    assert_user_error(run_cli("--prompt", "", "--no-mtp"), "empty")


@needs_shared
def test_prompt_longer_than_context():
    long_prompt = "value = compute(alpha, beta, gamma)\n" * 1200  # well over 4096 tokens
    line = assert_user_error(run_cli("--model", TARGET_REL, "--prompt", long_prompt), "context")
    assert str(CONTEXT) in line


@needs_shared
def test_max_tokens_beyond_context():
    assert_user_error(
        run_cli("--model", TARGET_REL, "--prompt", "x", "--max-tokens", str(CONTEXT + 10)),
        "max_tokens",
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--max-tokens", "-1"], "max_tokens"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--temp", "-1"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-k", "-2"], "top-k"),
        (["--num-draft-tokens", "-3"], "num_draft_tokens"),
        (["--chat-template-config", "{not json"], "chat-template-config"),
        (["--chat-template-config", "[1, 2]"], "chat-template-config"),
    ],
)
def test_bad_options(args, needle):
    assert_user_error(run_cli("--prompt", "x", *args), needle)


def test_non_utf8_stdin():
    assert_user_error(run_cli("--prompt", "-", stdin=b"def f():\n    return '\xff\xfe'\n"), "utf-8")


def test_argparse_errors_exit_2():
    p = run_cli("--num-draft-tokens", "lots")
    out, err = text(p)
    assert p.returncode == 2 and "Traceback" not in err
    assert sum("error:" in line for line in err.splitlines()) == 1


@needs_shared
def test_mismatched_drafter_is_a_user_error():
    # The target is not a drafter: a clear DrafterMismatchError, not a crash.
    assert_user_error(
        run_cli("--model", TARGET_REL, "--draft-model", TARGET_REL, "--prompt", "x"), "draft"
    )


@needs_shared
def test_keyboard_interrupt_exits_130_after_printing_text():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_mtp.generate",
            "--model",
            TARGET_REL,
            "--no-mtp",
            "--prompt",
            "import os\n",
            "--max-tokens",
            "3000",
        ],
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        got = b""
        deadline = time.monotonic() + 240
        while len(got) < 8 and time.monotonic() < deadline:  # wait for streamed text
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                got += chunk
        assert len(got) >= 8, "no streamed output before the deadline"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode("utf-8", "replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert (got + rest).strip()


# ---------------------------------------------------------------------------
# API


@pytest.fixture(scope="module")
def pair():
    if not (TARGET / "config.json").is_file():
        pytest.skip("../shared/models fixture missing")
    from mlx_mtp import load

    model, tokenizer = load(str(TARGET))
    drafter, _ = load(str(DRAFTER))
    return model, tokenizer, drafter


def test_import_is_light():
    code = (
        "import sys, mlx_mtp; "
        "heavy = [m for m in ('mlx_lm', 'transformers', 'torch', 'mlx_mtp.generate') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()


def test_public_names():
    import mlx_mtp

    names = "load generate stream_generate GenerationResponse Sampler make_sampler MtpError"
    for name in names.split() + ["GenerationError", "DrafterMismatchError"]:
        assert hasattr(mlx_mtp, name), name
    import mlx_mtp.generate  # noqa: F401  (the submodule must not shadow the function)

    assert callable(mlx_mtp.generate) and mlx_mtp.generate.__name__ == "generate"
    assert isinstance(mlx_mtp.__version__, str)


def test_generate_returns_text(pair):
    from mlx_mtp import generate

    model, tokenizer, drafter = pair
    out = generate(model, tokenizer, "def fibonacci(n):", max_tokens=24)
    assert isinstance(out, str) and out.strip()
    out_mtp = generate(model, tokenizer, "def fibonacci(n):", max_tokens=24, draft_model=drafter)
    assert isinstance(out_mtp, str) and out_mtp.strip()


def test_stream_generate_responses(pair):
    from mlx_mtp import GenerationResponse, stream_generate
    from mlx_mtp.speculative import GenerationStats

    model, tokenizer, drafter = pair
    responses = list(
        stream_generate(
            model, tokenizer, "import os\n", max_tokens=20, draft_model=drafter, num_draft_tokens=3
        )
    )
    assert responses and all(isinstance(r, GenerationResponse) for r in responses)
    for i, r in enumerate(responses):
        assert isinstance(r.text, str) and isinstance(r.token, int)
        assert isinstance(r.from_draft, bool)
        assert r.generation_tokens == i + 1
        assert r.prompt_tokens > 0 and r.peak_memory >= 0
    assert all(r.finish_reason is None and r.stats is None for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason in ("stop", "length")
    assert isinstance(last.stats, GenerationStats)
    assert last.stats.generation_tokens == len(responses)
    assert last.stats.drafted_tokens > 0
    assert last.prompt_tps > 0 and last.generation_tps > 0
    full = tokenizer.decode([r.token for r in responses if r.token not in tokenizer.eos_token_ids])
    streamed = "".join(r.text for r in responses)
    assert streamed == full or streamed == full[1:] and full[0] == " "  # mlx-lm trims one space


def test_finish_reason_length_after_exactly_max_tokens(pair):
    from mlx_mtp import stream_generate

    model, tokenizer, drafter = pair
    for draft in (None, drafter):
        responses = list(
            stream_generate(model, tokenizer, "import os\n", max_tokens=7, draft_model=draft)
        )
        assert len(responses) == 7
        assert responses[-1].finish_reason == "length"
        assert responses[-1].generation_tokens == 7


def test_stop_token_ends_with_stop(pair):
    from mlx_mtp import stream_generate

    model, tokenizer, _ = pair
    first = next(iter(stream_generate(model, tokenizer, "import os\n", max_tokens=1)))
    saved = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = saved | {first.token}
    try:
        responses = list(stream_generate(model, tokenizer, "import os\n", max_tokens=5))
    finally:
        tokenizer.eos_token_ids = saved
    assert len(responses) == 1
    assert responses[0].finish_reason == "stop" and responses[0].token == first.token
    assert responses[0].text == ""  # the stop token is not part of the text


def test_ids_prompt_used_as_given(pair):
    from mlx_mtp import stream_generate

    model, tokenizer, _ = pair
    ids = tokenizer.encode("import os\n")
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    by_text = list(stream_generate(model, tokenizer, "import os\n", max_tokens=6))
    by_ids = list(stream_generate(model, tokenizer, list(ids), max_tokens=6))
    assert by_ids[-1].prompt_tokens == len(ids) == by_text[-1].prompt_tokens
    assert [r.token for r in by_ids] == [r.token for r in by_text]
    no_bos = list(ids[1:])  # used as given: no <bos> is added
    r = list(stream_generate(model, tokenizer, no_bos, max_tokens=2))
    assert r[-1].prompt_tokens == len(no_bos)


def test_closing_early_leaves_nothing_broken(pair):
    from mlx_mtp import stream_generate

    model, tokenizer, drafter = pair
    for draft in (drafter, None):
        kw = dict(max_tokens=24, draft_model=draft)
        fresh = [r.token for r in stream_generate(model, tokenizer, "import sys\n", **kw)]
        gen = stream_generate(model, tokenizer, "import sys\n", **kw)
        head = [next(gen).token for _ in range(5)]
        gen.close()
        again = [r.token for r in stream_generate(model, tokenizer, "import sys\n", **kw)]
        assert head == fresh[:5]
        assert again == fresh


def test_seeded_sampling_is_reproducible(pair):
    from mlx_mtp import generate, make_sampler

    model, tokenizer, drafter = pair
    sampler = make_sampler(temp=1.0, top_p=0.95)
    a = generate(
        model, tokenizer, "import", max_tokens=16, sampler=sampler, seed=7, draft_model=drafter
    )
    b = generate(
        model, tokenizer, "import", max_tokens=16, sampler=sampler, seed=7, draft_model=drafter
    )
    assert a == b


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt=[]), "empty"),
        (dict(prompt="x", max_tokens=0), "max_tokens"),
        (dict(prompt="x", max_tokens=True), "max_tokens"),
        (dict(prompt="x", max_tokens=2.5), "max_tokens"),
        (dict(prompt="x", max_tokens=CONTEXT), "max_tokens"),
        (dict(prompt=[2] * CONTEXT), "context"),
        (dict(prompt=[2, 10**7]), "vocabulary"),
        (dict(prompt="x", num_draft_tokens=-1), "num_draft_tokens"),
        (dict(prompt="x", num_draft_tokens="many"), "num_draft_tokens"),
        (dict(prompt="x", sampler=lambda logits: logits), "sampler"),
        (dict(prompt="x", system="be brief"), "chat template"),
        (dict(prompt="x", seed="seven"), "seed"),
    ],
)
def test_api_errors_raise_generation_error(pair, kwargs, needle):
    from mlx_mtp import GenerationError, stream_generate

    model, tokenizer, _ = pair
    with pytest.raises(GenerationError) as info:
        stream_generate(model, tokenizer, **kwargs)  # raises on the call, before any work
    assert needle.lower() in str(info.value).lower()


def test_mismatched_drafter_raises(pair):
    from mlx_mtp import DrafterMismatchError, stream_generate

    model, tokenizer, _ = pair
    with pytest.raises(DrafterMismatchError):
        stream_generate(model, tokenizer, "x", draft_model=model)


# ---------------------------------------------------------------------------
# chat template handling (the fixture tokenizer has no template: give it one)


@pytest.fixture()
def templated(pair):
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(TARGET))
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n"
        "{% endfor %}{% if add_generation_prompt %}<model>{% endif %}{{ extra | default('') }}"
    )
    return TokenizerWrapper(hf, eos_token_ids=[1])


def test_chat_template_single_bos_system_and_kwargs(pair, templated):
    from mlx_mtp.generate import encode_prompt

    bos = templated.bos_token_id
    ids = encode_prompt(
        templated, "hello", system="be brief", chat_template_kwargs={"extra": "XYZ"}
    )
    assert ids[0] == bos and ids.count(bos) == 1
    rendered = templated.decode(ids)
    assert "<system>be brief</system>" in rendered and "<user>hello</user>" in rendered
    assert rendered.endswith("<model>XYZ")
    raw = encode_prompt(templated, "hello", chat_template=False)
    assert raw == templated.encode("hello") and raw.count(bos) == 1
    # a prompt that already starts with the <bos> text gets no second one
    assert encode_prompt(templated, "<bos>hello", chat_template=False).count(bos) == 1


def test_chat_template_error_is_generation_error(pair, templated):
    from mlx_mtp import GenerationError
    from mlx_mtp.generate import encode_prompt

    templated._tokenizer.chat_template = "{{ raise_exception('template says no') }}"
    with pytest.raises(GenerationError, match="template says no"):
        encode_prompt(templated, "hello")
    templated._tokenizer.chat_template = "{% for m in messages %}{{ m.content "  # syntax error
    with pytest.raises(GenerationError, match="chat template"):
        encode_prompt(templated, "hello")


def test_generate_with_chat_template(pair, templated):
    from mlx_mtp import stream_generate

    model, _, drafter = pair
    responses = list(stream_generate(model, templated, "hello", max_tokens=4, draft_model=drafter))
    assert responses[-1].finish_reason in ("stop", "length")
    expected = templated.encode("<bos><user>hello</user>\n<model>", add_special_tokens=False)
    assert responses[-1].prompt_tokens == len(expected)
