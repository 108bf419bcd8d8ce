"""Every bad input answered: one table of cases, each run through the CLI and the API.

Each case of ``CASES`` is run

* through the command line, in a subprocess, as a user would (``python -m mlx_mtp.generate`` or
  ``convert/convert.py``; interrupt and disk-full cases use a small driver that patches one
  function in the child and then calls the same ``main``): exit code 2 (130 for Ctrl-C), exactly one
  ``error:`` line on stderr, no traceback; and
* through the Python API: the documented ``MtpError`` subclass (a ``ValueError``) with the same
  message as the CLI line (``KeyboardInterrupt`` for the interrupt cases).

Cases that write (conversions) also check that nothing was left behind and that a pre-existing
output folder is byte-identical afterwards.  The broken checkpoints are built once per module from
the bundled demo pair (no download, no ``../shared`` needed).

``python tests/test_bad_input.py --table`` prints the table (case -> message) as markdown;
``--api-only`` skips the subprocesses (faster; interrupt rows then show the CLI's fixed message).

Existing, narrower coverage lives in ``test_cli.py`` (CLI flags), ``test_loading.py`` (checkpoint
validation details) and ``test_convert.py`` (conversion options, in-process interrupts); this module
is the one place that walks every kind of bad input end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(REPO) not in sys.path:  # `python tests/test_bad_input.py --table` from anywhere
    sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_mtp import errors as E  # noqa: E402

DEMO = REPO / "mlx_mtp" / "demo_models"
DEMO_TARGET = DEMO / "tiny-gemma4-code-4bit"
DEMO_DRAFTER = DEMO / "tiny-gemma4-code-assistant"
CONVERT_SCRIPT = REPO / "convert" / "convert.py"
SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONTEXT = 4096  # max_position_embeddings of the demo target
LONG_PROMPT = "value = compute(alpha, beta, gamma)\n" * 1200  # far more than 4096 tokens
EVIL_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
CLI_TIMEOUT = 240
INTERRUPTED = (
    "error: interrupted; nothing was written (the temporary output was removed and an existing "
    "--mlx-path was left as it was)"
)
# A message must say what to do, not only what is wrong.
ACTION = re.compile(
    r"\b(pass|use|give|shorten|download|convert|fix|restore|remove|choose|free|check|must|"
    r"decode|load|quantize|re-save|reinstall|put|delete|copy|log in|set)\b",
    re.I,
)


# ---------------------------------------------------------------------------------------------
# the broken inputs (built lazily, once)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def _edit_json(file: Path, fn: Callable[[dict], Any]) -> None:
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data, indent=2))


def _edit_shard(folder: Path, fn: Callable[[dict], Any]) -> None:
    file = folder / SHARD
    w = dict(mx.load(str(file)))
    fn(w)
    file.unlink()
    mx.save_safetensors(str(file), w, metadata={"format": "mlx"})


def tree_digest(root: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (folders as '<dir>')."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Workspace:
    """Lazily built broken model folders and conversion areas under one root."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._paths: Dict[str, Path] = {}
        self._pair = None
        self._templated = None

    def p(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = getattr(self, f"_build_{name}")(self.root / name)
        return self._paths[name]

    def s(self, name: str) -> str:
        return str(self.p(name))

    # -- models, loaded once for the API side ---------------------------------------------
    def pair(self):
        if self._pair is None:
            from mlx_mtp import load

            model, tok = load(str(DEMO_TARGET))
            drafter, dtok = load(str(DEMO_DRAFTER))
            self._pair = (model, tok, drafter, dtok)
        return self._pair

    # -- model folders --------------------------------------------------------------------
    def _build_target(self, d):
        return DEMO_TARGET

    def _build_drafter(self, d):
        return DEMO_DRAFTER

    def _build_missing(self, d):
        return d / "no" / "such" / "model"

    def _build_a_file(self, d):
        d.mkdir()
        f = d / "model.safetensors"
        f.write_bytes(b"\0" * 16)
        return f

    def _build_unreadable(self, d):
        _copy(DEMO_TARGET, d)
        d.chmod(0)
        return d

    def _build_unreadable_config(self, d):
        _copy(DEMO_TARGET, d)
        (d / "config.json").chmod(0)
        return d

    def _build_no_config(self, d):
        _copy(DEMO_TARGET, d)
        (d / "config.json").unlink()
        return d

    def _build_llama(self, d):
        _copy(DEMO_TARGET, d)
        _edit_json(d / "config.json", lambda c: c.update(model_type="llama"))
        return d

    def _build_pickle_only(self, d):
        d.mkdir()
        for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
            shutil.copyfile(DEMO_TARGET / name, d / name)
        # Not even a valid pickle: the loader must refuse without opening it.
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle, never opened")
        return d

    def _build_missing_shard(self, d):
        _copy(DEMO_TARGET, d)
        (d / SHARD).unlink()
        return d

    def _index_pointing_to(self, d, name):
        _copy(DEMO_TARGET, d)
        outside = d.parent / "x.safetensors"
        if not outside.exists():
            shutil.copyfile(DEMO_TARGET / SHARD, outside)  # exists: must be refused anyway
        _edit_json(d / INDEX, lambda i: i.update(weight_map={k: name for k in i["weight_map"]}))
        return d

    def _build_index_dotdot(self, d):
        return self._index_pointing_to(d, "../x.safetensors")

    def _build_index_absolute(self, d):
        return self._index_pointing_to(d, str(self.root / "x.safetensors"))

    def _build_truncated(self, d):
        _copy(DEMO_TARGET, d)
        data = (d / SHARD).read_bytes()
        (d / SHARD).write_bytes(data[: len(data) // 2])
        return d

    def _build_garbage_header(self, d):
        _copy(DEMO_TARGET, d)
        (d / SHARD).write_bytes(struct.pack("<Q", 1 << 40) + b"garbage" * 64)
        return d

    def _build_wrong_shape(self, d):
        _copy(DEMO_TARGET, d)
        _edit_shard(d, lambda w: w.update({"model.norm.weight": mx.ones((255,))}))
        return d

    def _build_wrong_dtype(self, d):
        _copy(DEMO_TARGET, d)
        key = "model.layers.0.input_layernorm.weight"
        _edit_shard(d, lambda w: w.update({key: w[key].astype(mx.int32)}))
        return d

    def _build_quant_mismatch(self, d):
        _copy(DEMO_TARGET, d)
        q = {"group_size": 64, "bits": 8, "mode": "affine"}
        _edit_json(d / "config.json", lambda c: c.update(quantization=q, quantization_config=q))
        return d

    def _build_quant_bits7(self, d):
        _copy(DEMO_TARGET, d)
        q = {"group_size": 64, "bits": 7}
        _edit_json(d / "config.json", lambda c: c.update(quantization=q, quantization_config=q))
        return d

    def _random_drafter(self, d, edit):
        """A drafter of the demo's layout with ``edit`` applied to its config (random weights)."""
        from mlx_mtp.models.gemma4_assistant import AssistantConfig, Drafter

        cfg = json.loads((DEMO_DRAFTER / "config.json").read_text())
        edit(cfg)
        drafter = Drafter(AssistantConfig.from_dict(cfg))
        weights = dict(tree_flatten(drafter.parameters()))
        mx.eval(list(weights.values()))
        d.mkdir()
        mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "mlx"})
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in ("generation_config.json",) + TOKENIZER_FILES:
            shutil.copyfile(DEMO_DRAFTER / name, d / name)
        return d

    def _build_drafter_hidden(self, d):
        return self._random_drafter(d, lambda c: c.update(backbone_hidden_size=128))

    def _build_drafter_vocab(self, d):
        return self._random_drafter(d, lambda c: c["text_config"].update(vocab_size=2048))

    def _build_drafter_heads(self, d):
        return self._random_drafter(d, lambda c: c["text_config"].update(head_dim=32))

    def _build_drafter_tokenizer(self, d):
        _copy(DEMO_DRAFTER, d)

        def add_token(t):
            t["added_tokens"].append(
                {
                    "id": 4096,
                    "content": "<extra_token>",
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            )

        _edit_json(d / "tokenizer.json", add_token)
        return d

    def _build_evil_template(self, d):
        _copy(DEMO_TARGET, d)
        _edit_json(d / "tokenizer_config.json", lambda t: t.update(chat_template=EVIL_TEMPLATE))
        return d

    # -- conversion areas: each case converts into <area>/out --------------------------------
    def area(self, name: str) -> Path:
        """``<root>/areas/<name>``; it holds an earlier conversion ``out`` if the case says so."""
        key = f"area:{name}"
        if key not in self._paths:
            a = self.root / "areas" / name
            a.mkdir(parents=True)
            if AREAS_WITH_OUTPUT.get(name):
                out = a / "out"
                _copy(DEMO_DRAFTER, out)
                (out / "notes.txt").write_text("an earlier conversion; must survive\n")
            self._paths[key] = a
        return self._paths[key]


# ---------------------------------------------------------------------------------------------
# the table


@dataclass
class Case:
    id: str
    what: str
    exc: type  # the API's exception (KeyboardInterrupt for interrupt cases)
    needle: str  # a piece of the message that names the problem
    cli: Callable[[Workspace], dict]  # {"argv": [...], "tool": ..., "stdin": ..., "driver": ...}
    api: Callable[[Workspace], Any]  # must raise ``exc``
    area: Optional[str] = None  # conversion area (checked: nothing left behind)
    existing: bool = False  # the area holds an earlier conversion that must survive unchanged
    skip: Optional[Callable[[Workspace], Optional[str]]] = None
    heavy: bool = False  # the CLI loads a model before failing (documentation only)
    notes: str = ""


def gen(*argv, stdin=None) -> dict:
    return {"tool": "generate", "argv": [str(a) for a in argv], "stdin": stdin}


def conv(*argv) -> dict:
    return {"tool": "convert", "argv": [str(a) for a in argv]}


def driver(patch: str, *argv) -> dict:
    return {"tool": "driver", "patch": patch, "argv": [str(a) for a in argv]}


def _load(ws, name):
    from mlx_mtp import load

    return load(ws.s(name))


def _stream(ws, prompt="x", model_override=None, **kw):
    """``stream_generate`` on the demo pair (``model_override="drafter"``: the drafter as model)."""
    from mlx_mtp import stream_generate

    model, tok, drafter, dtok = ws.pair()
    if model_override == "drafter":
        return stream_generate(drafter, dtok, prompt, **kw)
    return stream_generate(model, tok, prompt, **kw)


def _sampler(**kw):
    from mlx_mtp import make_sampler

    return make_sampler(**kw)


def _pair_with(ws, name):
    """API side of a mismatched pair: load the drafter, pair it (with tokenizers, as the CLI does)."""
    from mlx_mtp import load
    from mlx_mtp.speculative import check_pair

    model, tok, _, _ = ws.pair()
    drafter, dtok = load(ws.s(name))
    check_pair(model, drafter, tok, dtok)
    return _stream(ws, draft_model=drafter)


def _convert(ws, area, *, src=None, **kw):
    from mlx_mtp.convert import convert

    return convert(str(src or DEMO_DRAFTER), str(ws.area(area) / "out"), **kw)


def _unreadable_skip(name):
    def skip(ws):
        path = ws.p(name)
        target = path if name == "unreadable" else path / "config.json"
        try:
            if target.is_dir():
                os.listdir(target)
            else:
                target.read_bytes()
        except PermissionError:
            return None
        return "running as root (or with CAP_DAC_OVERRIDE): chmod 000 does not stop reads here"

    return skip


# In-process versions of the driver patches (the API side of interrupt / disk-full cases).
def _api_interrupt(ws, area, patch, force):
    import mlx_mtp.convert as cv

    undo = _install_patch(cv, patch, interrupt=lambda: signal.raise_signal(signal.SIGINT))
    try:
        _convert(ws, area, force=force)
    finally:
        undo()


def _api_disk_full(ws, area):
    import mlx_mtp.convert as cv

    undo = _install_patch(cv, "disk_full", interrupt=None)
    try:
        _convert(ws, area)
    finally:
        undo()


def _api_low_space(ws, area):
    import mlx_mtp.convert as cv

    undo = _install_patch(cv, "low_space", interrupt=None)
    try:
        _convert(ws, area)
    finally:
        undo()


def _install_patch(cv, patch: str, interrupt: Optional[Callable[[], None]]):
    """Patch ``mlx_mtp.convert`` at one milestone; returns an undo function.

    ``interrupt`` is called at the milestone (in-process: a real SIGINT to ourselves).  The same
    patch code runs in the CLI driver child, where the milestone prints a marker and waits for the
    parent's SIGINT instead.
    """
    ns: Dict[str, Any] = {}
    exec(_PATCH_CODE, ns)
    return ns["install"](cv, patch, interrupt)


# Shared by the in-process API side and the CLI driver child (which ``exec``s it too).
_PATCH_CODE = r"""
import errno, os, shutil, sys, time

def install(cv, patch, interrupt):
    undo = []

    def setattr_(obj, name, value):
        old = getattr(obj, name)
        undo.append(lambda: setattr(obj, name, old))
        setattr(obj, name, value)

    def milestone(name):
        if interrupt is not None:
            interrupt()

    if patch == "loading":
        orig = cv.loading.load_model
        calls = []
        def load_model(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                milestone("loading")
            return orig(*a, **k)
        setattr_(cv.loading, "load_model", load_model)
    elif patch == "writing":
        setattr_(cv, "MAX_SHARD_BYTES", 256 * 1024)  # several shards
        orig = cv.save_safetensors
        def save(file, tensors, metadata):
            orig(file, tensors, metadata)
            if os.path.basename(file).startswith("model-00002"):
                milestone("writing")
        setattr_(cv, "save_safetensors", save)
    elif patch == "copying":
        orig = cv.copy_support_files
        def copy(src, dst):
            out = orig(src, dst)
            milestone("copying")
            return out
        setattr_(cv, "copy_support_files", copy)
    elif patch == "verifying":
        orig = cv._verify
        def verify(*a, **k):
            milestone("verifying")
            return orig(*a, **k)
        setattr_(cv, "_verify", verify)
    elif patch == "replacing":
        orig = cv.os.replace
        state = []
        def replace(src, dst):
            orig(src, dst)
            if not state and ".old-" in os.path.basename(str(dst)):  # old output moved aside
                state.append(1)
                milestone("replacing")
        setattr_(cv.os, "replace", replace)
    elif patch == "disk_full":
        def full(file, tensors, metadata):
            with open(file, "wb") as f:  # a partial file, then the disk is full
                f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", file)
        setattr_(cv, "save_safetensors", full)
    elif patch == "low_space":
        real = shutil.disk_usage
        def usage(path):
            u = real(path)
            return type(u)(u.total, u.total - 4096, 4096)
        setattr_(cv.shutil, "disk_usage", usage)
    else:
        raise ValueError(patch)

    def restore():
        for fn in reversed(undo):
            fn()
    return restore
"""

# The CLI driver: patch one milestone, then run the real `main` of convert/convert.py.  At the
# milestone it prints a marker and sleeps; the parent sends a real SIGINT when it sees the marker.
_DRIVER = r"""
import sys, time, runpy
sys.path.insert(0, {repo!r})
import mlx_mtp.convert as cv
patch, argv = sys.argv[1], sys.argv[2:]
ns = {{}}
exec({code!r}, ns)

def interrupt():
    sys.stderr.write("@@milestone\n")
    sys.stderr.flush()
    # Ctrl-C ends this sleep with KeyboardInterrupt, except where the converter defers it
    # (while renaming the output into place): there the sleep just runs out.
    time.sleep(60 if patch != "replacing" else 3)

ns["install"](cv, patch, interrupt if patch not in ("disk_full", "low_space") else None)
sys.argv = [{script!r}] + argv
runpy.run_path({script!r}, run_name="__main__")
"""


def _interrupt_case(point: str, what: str, existing: bool = False) -> Case:
    area = f"sigint_{point}"

    def cli(ws):
        extra = ["--force"] if existing else []
        return driver(point, "--hf-path", DEMO_DRAFTER, "--mlx-path", ws.area(area) / "out", *extra)

    return Case(
        id=f"convert_sigint_{point}",
        what=what,
        exc=KeyboardInterrupt,
        needle="interrupted",
        cli=cli,
        api=lambda ws: _api_interrupt(ws, area, point, existing),
        area=area,
        existing=existing,
        heavy=True,
    )


CASES: List[Case] = [
    # --- paths and folders ------------------------------------------------------------------
    Case(
        "missing_path",
        "model path does not exist",
        E.ModelNotFoundError,
        "does not exist",
        lambda ws: gen("--model", ws.p("missing"), "--prompt", "x"),
        lambda ws: _load(ws, "missing"),
    ),
    Case(
        "path_is_a_file",
        "model path is a file, not a folder",
        E.ModelNotFoundError,
        "is a file",
        lambda ws: gen("--model", ws.p("a_file"), "--prompt", "x"),
        lambda ws: _load(ws, "a_file"),
    ),
    Case(
        "unreadable_folder",
        "model folder unreadable (chmod 000)",
        E.ModelNotFoundError,
        "permission",
        lambda ws: gen("--model", ws.p("unreadable"), "--prompt", "x"),
        lambda ws: _load(ws, "unreadable"),
        skip=_unreadable_skip("unreadable"),
    ),
    Case(
        "unreadable_config",
        "config.json unreadable (chmod 000)",
        E.ModelConfigError,
        "cannot read",
        lambda ws: gen("--model", ws.p("unreadable_config"), "--prompt", "x"),
        lambda ws: _load(ws, "unreadable_config"),
        skip=_unreadable_skip("unreadable_config"),
    ),
    Case(
        "no_config",
        "folder without config.json",
        E.ModelConfigError,
        "no config.json",
        lambda ws: gen("--model", ws.p("no_config"), "--prompt", "x"),
        lambda ws: _load(ws, "no_config"),
    ),
    Case(
        "unsupported_model_type",
        "unsupported model_type (llama)",
        E.ModelConfigError,
        "unsupported model_type 'llama'",
        lambda ws: gen("--model", ws.p("llama"), "--prompt", "x"),
        lambda ws: _load(ws, "llama"),
    ),
    Case(
        "pickle_only",
        "only pytorch_model.bin (pickle), no safetensors",
        E.CheckpointError,
        "pickle",
        lambda ws: gen("--model", ws.p("pickle_only"), "--prompt", "x"),
        lambda ws: _load(ws, "pickle_only"),
    ),
    # --- roles and pairs --------------------------------------------------------------------
    Case(
        "drafter_as_target",
        "--model given the assistant (drafter)",
        E.DrafterMismatchError,
        "assistant drafter, not a target",
        lambda ws: gen("--model", DEMO_DRAFTER, "--prompt", "x"),
        lambda ws: _stream(ws, model_override="drafter"),
    ),
    Case(
        "target_as_drafter",
        "--draft-model given a target",
        E.DrafterMismatchError,
        "target model, not an assistant",
        lambda ws: gen("--model", DEMO_TARGET, "--draft-model", DEMO_TARGET, "--prompt", "x"),
        lambda ws: _stream(ws, draft_model=ws.pair()[0]),
    ),
    Case(
        "pair_hidden_size",
        "drafter made for another hidden size",
        E.DrafterMismatchError,
        "backbone_hidden_size 128 != target hidden_size 256",
        lambda ws: gen("--model", DEMO_TARGET, "--draft-model", ws.p("drafter_hidden"), "-p", "x"),
        lambda ws: _pair_with(ws, "drafter_hidden"),
        heavy=True,
    ),
    Case(
        "pair_vocabulary",
        "drafter with another vocabulary size",
        E.DrafterMismatchError,
        "vocab_size 2048 != target vocab_size 4096",
        lambda ws: gen("--model", DEMO_TARGET, "--draft-model", ws.p("drafter_vocab"), "-p", "x"),
        lambda ws: _pair_with(ws, "drafter_vocab"),
        heavy=True,
    ),
    Case(
        "pair_tokenizer",
        "drafter with another tokenizer",
        E.DrafterMismatchError,
        "tokenizer differs",
        lambda ws: gen(
            "--model", DEMO_TARGET, "--draft-model", ws.p("drafter_tokenizer"), "-p", "x"
        ),
        lambda ws: _pair_with(ws, "drafter_tokenizer"),
        heavy=True,
    ),
    Case(
        "pair_head_layout",
        "drafter with another attention head layout",
        E.DrafterMismatchError,
        "head_dim 32",
        lambda ws: gen("--model", DEMO_TARGET, "--draft-model", ws.p("drafter_heads"), "-p", "x"),
        lambda ws: _pair_with(ws, "drafter_heads"),
        heavy=True,
    ),
    # --- weight files -----------------------------------------------------------------------
    Case(
        "missing_shard",
        "shard listed in the index is missing",
        E.CheckpointError,
        "is missing",
        lambda ws: gen("--model", ws.p("missing_shard"), "--prompt", "x"),
        lambda ws: _load(ws, "missing_shard"),
    ),
    Case(
        "index_dotdot",
        "index names ../x.safetensors",
        E.CheckpointError,
        "not a plain",
        lambda ws: gen("--model", ws.p("index_dotdot"), "--prompt", "x"),
        lambda ws: _load(ws, "index_dotdot"),
    ),
    Case(
        "index_absolute",
        "index names an absolute path",
        E.CheckpointError,
        "not a plain",
        lambda ws: gen("--model", ws.p("index_absolute"), "--prompt", "x"),
        lambda ws: _load(ws, "index_absolute"),
    ),
    Case(
        "truncated_safetensors",
        "truncated safetensors file",
        E.CheckpointError,
        "truncated or corrupt",
        lambda ws: gen("--model", ws.p("truncated"), "--prompt", "x"),
        lambda ws: _load(ws, "truncated"),
    ),
    Case(
        "garbage_header",
        "safetensors file with a garbage header",
        E.CheckpointError,
        "header length",
        lambda ws: gen("--model", ws.p("garbage_header"), "--prompt", "x"),
        lambda ws: _load(ws, "garbage_header"),
    ),
    Case(
        "wrong_shape",
        "tensor of the wrong shape",
        E.CheckpointError,
        "model.norm.weight has shape (255,)",
        lambda ws: gen("--model", ws.p("wrong_shape"), "--prompt", "x"),
        lambda ws: _load(ws, "wrong_shape"),
        heavy=True,
    ),
    Case(
        "wrong_dtype",
        "tensor of the wrong dtype (int32 norm weight)",
        E.CheckpointError,
        "has dtype mlx.core.int32",
        lambda ws: gen("--model", ws.p("wrong_dtype"), "--prompt", "x"),
        lambda ws: _load(ws, "wrong_dtype"),
        heavy=True,
    ),
    Case(
        "quant_block_mismatch",
        "quantization block (8 bits) does not match the 4-bit tensors",
        E.CheckpointError,
        "imply bits=4",
        lambda ws: gen("--model", ws.p("quant_mismatch"), "--prompt", "x"),
        lambda ws: _load(ws, "quant_mismatch"),
        heavy=True,
    ),
    Case(
        "quant_bits_unsupported_config",
        "config.json quantized with unsupported bits (7)",
        E.ModelConfigError,
        "unsupported bits 7",
        lambda ws: gen("--model", ws.p("quant_bits7"), "--prompt", "x"),
        lambda ws: _load(ws, "quant_bits7"),
        heavy=True,
    ),
    Case(
        "convert_q_bits_unsupported",
        "convert -q --q-bits 7",
        E.ConversionError,
        "unsupported --q-bits 7",
        lambda ws: conv(
            "--hf-path", DEMO_DRAFTER, "--mlx-path", ws.area("qbits") / "out", "-q", "--q-bits", 7
        ),
        lambda ws: _convert(ws, "qbits", quantize=True, q_bits=7),
        area="qbits",
    ),
    Case(
        "convert_q_group_unsupported",
        "convert -q --q-group-size 48",
        E.ConversionError,
        "unsupported --q-group-size 48",
        lambda ws: conv(
            "--hf-path",
            DEMO_DRAFTER,
            "--mlx-path",
            ws.area("qgroup") / "out",
            "-q",
            "--q-group-size",
            48,
        ),
        lambda ws: _convert(ws, "qgroup", quantize=True, q_group_size=48),
        area="qgroup",
    ),
    # --- prompts ----------------------------------------------------------------------------
    Case(
        "empty_prompt",
        "empty prompt",
        E.GenerationError,
        "prompt is empty",
        lambda ws: gen("--model", DEMO_TARGET, "--prompt", ""),
        lambda ws: _stream(ws, ""),
    ),
    Case(
        "prompt_over_context",
        "prompt longer than the context",
        E.GenerationError,
        f"context is {CONTEXT} tokens",
        lambda ws: gen("--model", DEMO_TARGET, "--no-mtp", "--prompt", "-", stdin=LONG_PROMPT),
        lambda ws: _stream(ws, LONG_PROMPT),
        heavy=True,
    ),
    Case(
        "non_utf8_stdin",
        "prompt on stdin is not UTF-8",
        E.GenerationError,
        "not valid UTF-8",
        lambda ws: gen("--model", DEMO_TARGET, "--prompt", "-", stdin=b"def f():\n  '\xff\xfe'\n"),
        lambda ws: _stream(ws, b"def f():\n  '\xff\xfe'\n"),
    ),
    Case(
        "non_utf8_argument",
        "--prompt argument with a non-UTF-8 byte (a lone surrogate in Python)",
        E.GenerationError,
        "lone surrogate",
        lambda ws: gen("--model", DEMO_TARGET, "--prompt", os.fsdecode(b"abc\xff")),
        lambda ws: _stream(ws, os.fsdecode(b"abc\xff")),
    ),
    Case(
        "malicious_chat_template",
        "chat template reaching for Python internals",
        E.GenerationError,
        "unsafe",
        lambda ws: gen("--model", ws.p("evil_template"), "--no-mtp", "--prompt", "x"),
        lambda ws: _stream_templated(ws, "evil_template"),
        heavy=True,
    ),
    Case(
        "template_config_invalid_json",
        "--chat-template-config that is not JSON (API: a JSON string instead of a dict)",
        E.GenerationError,
        "chat-template-config",
        lambda ws: gen("--model", DEMO_TARGET, "--chat-template-config", "{not json", "-p", "x"),
        lambda ws: _stream(ws, chat_template_kwargs="{not json"),
        notes="CLI-only syntax: the API message differs (it names the dict it wanted)",
    ),
    Case(
        "template_config_not_object",
        "--chat-template-config that is a JSON list",
        E.GenerationError,
        "must be a JSON object / dict",
        lambda ws: gen("--model", DEMO_TARGET, "--chat-template-config", "[1, 2]", "-p", "x"),
        lambda ws: _stream(ws, chat_template_kwargs=[1, 2]),
    ),
    Case(
        "template_config_reserved",
        "--chat-template-config overriding add_generation_prompt",
        E.GenerationError,
        "'add_generation_prompt' is set by mlx-mtp",
        lambda ws: gen(
            "--model",
            DEMO_TARGET,
            "--chat-template-config",
            '{"add_generation_prompt": false}',
            "-p",
            "x",
        ),
        lambda ws: _stream(ws, chat_template_kwargs={"add_generation_prompt": False}),
    ),
    # --- numbers ----------------------------------------------------------------------------
    Case(
        "max_tokens_negative",
        "--max-tokens -5",
        E.GenerationError,
        "max_tokens must be an integer >= 1",
        lambda ws: gen("--model", DEMO_TARGET, "--max-tokens", -5, "-p", "x"),
        lambda ws: _stream(ws, max_tokens=-5),
    ),
    Case(
        "max_tokens_absurd",
        "--max-tokens 10**12",
        E.GenerationError,
        "does not fit",
        lambda ws: gen("--model", DEMO_TARGET, "--no-mtp", "--max-tokens", 10**12, "-p", "x"),
        lambda ws: _stream(ws, max_tokens=10**12),
        heavy=True,
    ),
    Case(
        "temp_negative",
        "--temp -1",
        E.GenerationError,
        "temperature must be",
        lambda ws: gen("--model", DEMO_TARGET, "--temp", -1, "-p", "x"),
        lambda ws: _sampler(temp=-1),
    ),
    Case(
        "temp_absurd",
        "--temp 1e9",
        E.GenerationError,
        "absurd",
        lambda ws: gen("--model", DEMO_TARGET, "--temp", "1e9", "-p", "x"),
        lambda ws: _sampler(temp=1e9),
    ),
    Case(
        "temp_nan",
        "--temp nan",
        E.GenerationError,
        "finite",
        lambda ws: gen("--model", DEMO_TARGET, "--temp", "nan", "-p", "x"),
        lambda ws: _sampler(temp=float("nan")),
    ),
    Case(
        "top_p_negative",
        "--top-p -0.5",
        E.GenerationError,
        "top-p must be in (0, 1]",
        lambda ws: gen("--model", DEMO_TARGET, "--top-p", -0.5, "-p", "x"),
        lambda ws: _sampler(temp=1.0, top_p=-0.5),
    ),
    Case(
        "top_p_absurd",
        "--top-p 7",
        E.GenerationError,
        "top-p must be in (0, 1]",
        lambda ws: gen("--model", DEMO_TARGET, "--top-p", 7, "-p", "x"),
        lambda ws: _sampler(temp=1.0, top_p=7.0),
    ),
    Case(
        "num_draft_tokens_negative",
        "--num-draft-tokens -1",
        E.GenerationError,
        "num_draft_tokens must be",
        lambda ws: gen("--model", DEMO_TARGET, "--num-draft-tokens", -1, "-p", "x"),
        lambda ws: _stream(ws, num_draft_tokens=-1),
    ),
    Case(
        "num_draft_tokens_absurd",
        "--num-draft-tokens 1000",
        E.GenerationError,
        "num_draft_tokens must be 'auto' or an integer in 0..",
        lambda ws: gen("--model", DEMO_TARGET, "--num-draft-tokens", 1000, "-p", "x"),
        lambda ws: _stream(ws, num_draft_tokens=1000),
    ),
    Case(
        "seed_negative",
        "--seed -1",
        E.GenerationError,
        "seed must be an integer in 0..",
        lambda ws: gen("--model", DEMO_TARGET, "--seed", -1, "-p", "x"),
        lambda ws: _stream(ws, seed=-1),
    ),
    Case(
        "prefill_step_zero",
        "--prefill-step-size 0",
        E.GenerationError,
        "prefill_step_size must be",
        lambda ws: gen("--model", DEMO_TARGET, "--prefill-step-size", 0, "-p", "x"),
        lambda ws: _stream(ws, prefill_step_size=0),
    ),
    # --- conversion -------------------------------------------------------------------------
    Case(
        "convert_into_existing",
        "conversion into an existing folder (no --force)",
        E.ConversionError,
        "already exists",
        lambda ws: conv("--hf-path", DEMO_DRAFTER, "--mlx-path", ws.area("exists") / "out"),
        lambda ws: _convert(ws, "exists"),
        area="exists",
        existing=True,
    ),
    Case(
        "convert_disk_full",
        "disk full (ENOSPC) while writing a shard",
        E.ConversionError,
        "disk full",
        lambda ws: driver(
            "disk_full", "--hf-path", DEMO_DRAFTER, "--mlx-path", ws.area("full") / "out"
        ),
        lambda ws: _api_disk_full(ws, "full"),
        area="full",
        heavy=True,
    ),
    Case(
        "convert_low_space",
        "not enough free space for the weights",
        E.ConversionError,
        "not enough disk space",
        lambda ws: driver(
            "low_space", "--hf-path", DEMO_DRAFTER, "--mlx-path", ws.area("low") / "out"
        ),
        lambda ws: _api_low_space(ws, "low"),
        area="low",
        heavy=True,
    ),
    _interrupt_case("loading", "Ctrl-C (SIGINT) while loading the source"),
    _interrupt_case("writing", "Ctrl-C (SIGINT) between two shards"),
    _interrupt_case("copying", "Ctrl-C (SIGINT) after copying the tokenizer"),
    _interrupt_case("verifying", "Ctrl-C (SIGINT) while verifying", existing=True),
    _interrupt_case(
        "replacing", "Ctrl-C (SIGINT) while replacing an existing output (--force)", existing=True
    ),
]


# Areas whose case starts from an earlier conversion (that must survive byte-identical).
AREAS_WITH_OUTPUT = {c.area: c.existing for c in CASES if c.area is not None}


def _stream_templated(ws, name):
    from mlx_mtp import stream_generate
    from mlx_mtp.loading import load_tokenizer

    model = ws.pair()[0]
    return stream_generate(model, load_tokenizer(ws.p(name)), "x")


# ---------------------------------------------------------------------------------------------
# running a case


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    notes: List[str] = field(default_factory=list)

    @property
    def error_lines(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if "error:" in line]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("PYTHONWARNINGS", None)
    return env


def run_cli(spec: dict) -> CliResult:
    tic = time.monotonic()
    if spec["tool"] == "generate":
        cmd = [sys.executable, "-m", "mlx_mtp.generate", *spec["argv"]]
    elif spec["tool"] == "convert":
        cmd = [sys.executable, str(CONVERT_SCRIPT), *spec["argv"]]
    else:
        code = _DRIVER.format(repo=str(REPO), code=_PATCH_CODE, script=str(CONVERT_SCRIPT))
        cmd = [sys.executable, "-c", code, spec["patch"], *spec["argv"]]
        if spec["patch"] not in ("disk_full", "low_space"):
            return _run_interrupted(cmd, tic)
    stdin = spec.get("stdin")
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    p = subprocess.run(
        cmd,
        cwd=REPO,
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=_env(),
        timeout=CLI_TIMEOUT,
    )
    return CliResult(
        p.returncode,
        p.stdout.decode("utf-8", "replace"),
        p.stderr.decode("utf-8", "replace"),
        time.monotonic() - tic,
    )


def _run_interrupted(cmd: List[str], tic: float) -> CliResult:
    """Start the driver, wait for its milestone marker on stderr, send a real SIGINT."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    err = b""
    notes = []
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while b"@@milestone\n" not in err and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                err += chunk
        if b"@@milestone\n" in err:
            proc.send_signal(signal.SIGINT)
            notes.append("SIGINT sent at the milestone")
        else:
            notes.append("milestone never reached")
        out, rest = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (err + rest).decode("utf-8", "replace").replace("@@milestone\n", "")
    return CliResult(
        proc.returncode, out.decode("utf-8", "replace"), stderr, time.monotonic() - tic, notes
    )


def normalize(text: str) -> str:
    return " ".join(text.split())


def run_api(case: Case, ws: Workspace) -> BaseException:
    """Run the API side; returns the exception (AssertionError if none was raised)."""
    try:
        result = case.api(ws)
        if hasattr(result, "__next__"):  # a generator that did not fail on the call
            next(result)
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt is an expected outcome here
        return exc
    return AssertionError(f"{case.id}: the API raised nothing")


def run_all_cli(ws: Workspace, cases: List[Case], workers: int = 3) -> Dict[str, CliResult]:
    """All CLI sides, a few subprocesses at a time (each pays for Python + MLX start-up)."""
    todo = []
    for case in cases:
        if case.skip is not None and case.skip(ws):
            continue
        todo.append((case.id, case.cli(ws)))  # builds the inputs (in this thread)
    # Slow ones first so the pool stays busy.
    todo.sort(key=lambda item: item[1]["tool"] != "driver")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {cid: pool.submit(run_cli, spec) for cid, spec in todo}
        return {cid: f.result() for cid, f in futures.items()}


def check_area(ws: Workspace, case: Case, before: Dict[str, str], side: str) -> None:
    if case.area is None:
        return
    after = tree_digest(ws.area(case.area))
    assert after == before, (
        f"{case.id} ({side}) changed its output area:\n"
        f"  before {sorted(before)}\n  after  {sorted(after)}"
    )


# ---------------------------------------------------------------------------------------------
# tests

try:
    import pytest
except ImportError:  # the --table mode works without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def ws(tmp_path_factory):
        w = Workspace(tmp_path_factory.mktemp("bad_input"))
        yield w
        for name in ("unreadable", "unreadable_config"):  # let pytest delete the tree
            path = w._paths.get(name)
            if path is not None:
                path.chmod(0o755)
                if (path / "config.json").exists():
                    (path / "config.json").chmod(0o644)

    @pytest.fixture(scope="module")
    def baseline(ws):
        """Output areas as they were before anything ran (built before the CLI runs)."""
        return {c.id: tree_digest(ws.area(c.area)) for c in CASES if c.area is not None}

    @pytest.fixture(scope="module")
    def cli_results(ws, baseline):
        return run_all_cli(ws, CASES)

    def test_table_is_big_and_well_formed():
        ids = [c.id for c in CASES]
        assert len(ids) == len(set(ids)) and len(ids) >= 25
        for c in CASES:
            assert issubclass(c.exc, (E.MtpError, KeyboardInterrupt)), c.id
            if issubclass(c.exc, E.MtpError):
                assert issubclass(c.exc, ValueError), c.id

    @pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
    def test_bad_input(case: Case, ws, baseline, cli_results):
        if case.skip is not None:
            reason = case.skip(ws)
            if reason:
                pytest.skip(reason)
        # --- CLI ---
        r = cli_results[case.id]
        where = (
            f"{case.id}: exit {r.returncode} {r.notes}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        )
        interrupt = case.exc is KeyboardInterrupt
        assert r.returncode == (130 if interrupt else 2), where
        assert "Traceback" not in r.stderr + r.stdout, where
        assert len(r.error_lines) == 1, where
        line = r.error_lines[0]
        assert line.startswith("error: "), where
        assert case.needle.lower() in line.lower(), where
        if not interrupt:
            assert ACTION.search(line), f"{case.id}: the message does not say what to do: {line}"
        if case.area is not None:
            check_area(ws, case, baseline[case.id], "CLI")
        # --- API ---
        exc = run_api(case, ws)
        if interrupt:
            assert isinstance(exc, KeyboardInterrupt), repr(exc)
            assert line == INTERRUPTED
        else:
            assert type(exc) is case.exc, f"{case.id}: API raised {exc!r}"
            assert isinstance(exc, E.MtpError) and isinstance(exc, ValueError)
            if not case.notes.startswith("CLI-only"):
                assert normalize(line) == normalize(f"error: {exc}"), (line, str(exc))
            else:
                assert ACTION.search(str(exc)), str(exc)
        if case.area is not None:
            check_area(ws, case, baseline[case.id], "API")

    def test_model_type_names_match_the_model_modules():
        """loading.py names the types itself (so a wrong folder is refused before model code loads)."""
        from mlx_mtp import loading
        from mlx_mtp.models import gemma4, gemma4_assistant

        assert loading.TARGET_MODEL_TYPES == tuple(gemma4.TARGET_MODEL_TYPES)
        assert loading.ASSISTANT_MODEL_TYPES == tuple(gemma4_assistant.ASSISTANT_MODEL_TYPES)

    def test_dtype_auto_keeps_the_checkpoint_dtype_on_every_backend():
        """--dtype auto never looks at the device; the demo is stored in float32 (fast on CPUs)."""
        import importlib
        import inspect

        g = importlib.import_module(
            "mlx_mtp.generate"
        )  # the module (mlx_mtp.generate is the function)

        assert g._load_dtype("auto") is None and g._load_dtype("bfloat16") == "bfloat16"
        assert "default_device" not in inspect.getsource(
            g
        ) and "DeviceType" not in inspect.getsource(g)
        scales = [
            v.dtype
            for k, v in mx.load(str(DEMO_TARGET / SHARD)).items()
            if k.endswith((".scales", ".biases"))
        ]
        assert scales and all(d == mx.float32 for d in scales)
        floats = [v.dtype for v in mx.load(str(DEMO_DRAFTER / SHARD)).values()]
        assert all(d == mx.float32 for d in floats if mx.issubdtype(d, mx.floating))

    def test_unknown_template_variables_pass_through(ws):
        """Documented choice: variables the template does not use are passed on and ignored."""
        from mlx_mtp.generate import encode_prompt
        from mlx_mtp.loading import load_tokenizer

        folder = _copy(DEMO_TARGET, ws.root / "templated")
        template = (
            "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
            "{% endfor %}{% if add_generation_prompt %}<model>{% endif %}"
        )
        _edit_json(folder / "tokenizer_config.json", lambda t: t.update(chat_template=template))
        tok = load_tokenizer(folder)
        plain = encode_prompt(tok, "hello")
        extra = encode_prompt(tok, "hello", chat_template_kwargs={"no_such_option": 1, "x-y": []})
        assert plain == extra and plain[0] == tok.bos_token_id


# ---------------------------------------------------------------------------------------------
# `python tests/test_bad_input.py --table`


def _table(api_only: bool) -> str:
    rows = ["| # | case | CLI exit | API exception | message |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        try:
            cli = {} if api_only else run_all_cli(ws, CASES)
            for i, case in enumerate(CASES, 1):
                reason = case.skip(ws) if case.skip else None
                if reason:
                    rows.append(f"| {i} | {case.what} | skipped | - | ({reason}) |")
                    continue
                exc = run_api(case, ws)
                r = cli.get(case.id)
                if isinstance(exc, KeyboardInterrupt):
                    message = r.error_lines[0] if r and r.error_lines else INTERRUPTED
                else:
                    message = f"error: {normalize(str(exc))}"
                    if r is not None and r.error_lines and not case.notes.startswith("CLI-only"):
                        if normalize(r.error_lines[0]) != normalize(message):
                            message += f" **(CLI differs: {r.error_lines[0]})**"
                    elif r is not None and r.error_lines:
                        message = r.error_lines[0] + f" (API: {normalize(str(exc))})"
                code = str(r.returncode) if r else ("130" if case.exc is KeyboardInterrupt else "2")
                message = message.replace(str(ws.root), "<tmp>").replace(str(REPO), "<repo>")
                message = message.replace("|", "\\|")
                rows.append(f"| {i} | {case.what} | {code} | {type(exc).__name__} | {message} |")
        finally:
            for name in ("unreadable", "unreadable_config"):
                path = ws._paths.get(name)
                if path is not None:
                    path.chmod(0o755)
                    if (path / "config.json").exists():
                        (path / "config.json").chmod(0o644)
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    parser.add_argument("--api-only", action="store_true", help="skip the CLI subprocesses")
    a = parser.parse_args()
    if not a.table:
        parser.error("nothing to do: pass --table (run the checks with pytest)")
    print(_table(a.api_only))
