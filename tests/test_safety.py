"""Loading a checkpoint never runs code from it and never reads outside it.

* Weights come only from ``*.safetensors``: a folder with only ``pytorch_model.bin`` is refused
  with a message saying to convert it, and no pickle is ever opened (``pickle``/``torch.load`` are
  booby-trapped here, and a malicious pickle beside the safetensors stays untouched).
* No remote code: ``trust_remote_code`` is never passed as true, and ``auto_map`` entries in
  ``config.json`` / ``tokenizer_config.json`` pointing at a Python file in the folder never run it.
* Paths: index entries must be plain file names in the folder (``..``, absolute paths, sub-folders
  are refused); symlinked files are allowed on purpose, because the Hugging Face hub cache stores
  every file of a snapshot as a symlink into ``../../blobs/``.
* Chat templates render in jinja2's ``ImmutableSandboxedEnvironment`` (transformers'
  ``apply_chat_template``, which mlx-lm's ``TokenizerWrapper`` calls): a template reaching for Python
  internals raises a clear ``GenerationError`` and does not execute.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest

from mlx_mtp.errors import CheckpointError, GenerationError, MtpError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mlx_mtp" / "demo_models"
TARGET = DEMO / "tiny-gemma4-code-4bit"
DRAFTER = DEMO / "tiny-gemma4-code-assistant"
SHARD = "model-00001-of-00001.safetensors"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


class _Boom:
    """Unpickling this creates ``path`` (proof that the pickle ran)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _evil_pickle(folder: Path, marker: Path, name="pytorch_model.bin") -> Path:
    file = folder / name
    file.write_bytes(pickle.dumps(_Boom(marker)))
    return file


@pytest.fixture
def no_pickles(monkeypatch):
    """Every way to unpickle raises; every Python-level ``open`` is recorded."""

    def trap(*a, **k):
        raise AssertionError("a pickle was about to be loaded")

    class TrapUnpickler:
        def __init__(self, *a, **k):
            trap()

    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "Unpickler", TrapUnpickler)
    if "torch" in sys.modules:
        monkeypatch.setattr(sys.modules["torch"], "load", trap)
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return opened


# ---------------------------------------------------------------------------------------------
# weights only from safetensors


def test_pickle_beside_safetensors_is_never_opened(tmp_path, no_pickles):
    from mlx_mtp import load

    folder = _copy(TARGET, tmp_path / "m")
    marker = tmp_path / "pickle-ran"
    _evil_pickle(folder, marker)
    _evil_pickle(folder, marker, "model.pt")
    no_pickles.clear()  # only what loading opens counts
    _, tok = load(str(folder))
    assert tok.encode("import os")[0] == 2
    assert not marker.exists()
    assert not [f for f in no_pickles if f.endswith((".bin", ".pt"))], no_pickles


def test_only_pickle_weights_refused_with_a_fix(tmp_path, no_pickles):
    from mlx_mtp import load

    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TARGET / name, folder / name)
    marker = tmp_path / "pickle-ran"
    _evil_pickle(folder, marker)
    no_pickles.clear()
    with pytest.raises(CheckpointError) as e:
        load(str(folder))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "convert" in msg
    assert not marker.exists()
    assert not [f for f in no_pickles if f.endswith(".bin")], no_pickles


def test_hub_downloads_no_code_and_no_pickles():
    from fnmatch import fnmatch

    from mlx_mtp.loading import HUB_ALLOW_PATTERNS

    for name in ("modeling_gemma.py", "evil.py", "pytorch_model.bin", "model.pt", "x.pkl",
                 "model.ckpt", "tokenization_x.py"):  # fmt: skip
        assert not any(fnmatch(name, p) for p in HUB_ALLOW_PATTERNS), name
    assert any(fnmatch("model-00001-of-00002.safetensors", p) for p in HUB_ALLOW_PATTERNS)


# ---------------------------------------------------------------------------------------------
# no remote code


def test_trust_remote_code_is_never_set(monkeypatch):
    from transformers import AutoTokenizer

    from mlx_mtp import load

    calls = []
    real = AutoTokenizer.from_pretrained

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    load(str(TARGET))
    load(str(DRAFTER))
    assert calls and not any(k.get("trust_remote_code") for k in calls), calls
    for src in (REPO / "mlx_mtp").rglob("*.py"):
        text = src.read_text()
        assert "trust_remote_code=True" not in text.replace(" ", ""), src


@pytest.mark.parametrize("local_class", [True, False])
def test_auto_map_code_in_the_folder_never_runs(tmp_path, local_class):
    from mlx_mtp import load

    folder = _copy(TARGET, tmp_path / "m")
    ran = folder / "evil.py.ran"
    (folder / "evil.py").write_text(
        "open(__file__ + '.ran', 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
        "class EvilConfig: pass\nclass EvilModel: pass\n"
    )
    auto = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilModel",
        "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"],
    }
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = auto
    (folder / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": auto["AutoTokenizer"]}
    if not local_class:
        tcfg["tokenizer_class"] = "EvilTokenizer"  # only the remote code could provide it
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    try:
        load(str(folder))  # either it loads with the built-in classes ...
    except MtpError as e:  # ... or it refuses clearly
        assert "tokenizer" in str(e)
    assert not ran.exists(), "code from the checkpoint folder was executed"


# ---------------------------------------------------------------------------------------------
# paths


@pytest.mark.parametrize(
    "name",
    [
        "../x.safetensors",
        "/tmp/x.safetensors",
        "sub/x.safetensors",
        "sub/../../x.safetensors",
        "..\\x.safetensors",
        "x.safetensors\x00.txt",
        "x.bin",
        "",
        7,
    ],
)
def test_index_entries_must_be_plain_names(tmp_path, name):
    from mlx_mtp.loading import weight_files

    folder = _copy(TARGET, tmp_path / "m")
    (folder / "sub").mkdir()
    shutil.copyfile(folder / SHARD, folder / "sub" / "x.safetensors")
    shutil.copyfile(folder / SHARD, tmp_path / "x.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: name for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain"):
        weight_files(folder)


def test_hub_cache_symlinks_are_followed(tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays them out."""
    import mlx.core as mx

    from mlx_mtp import load

    blobs = tmp_path / "repo" / "blobs"
    snap = tmp_path / "repo" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in TARGET.iterdir() if p.is_file())):
        shutil.copyfile(f, blobs / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / f.name)
    model, tok = load(str(snap))
    ref, _ = load(str(TARGET))
    ids = mx.array([tok.encode("import os")])
    assert mx.array_equal(model(ids), ref(ids)).item()


# ---------------------------------------------------------------------------------------------
# chat templates


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
        "{{ self.__init__.__globals__.__builtins__.open('{marker}', 'w') }}",
        "{% set x = namespace() %}{% set x.__class__ = 1 %}{{ x }}",
    ],
)
def test_malicious_chat_template_is_sandboxed(tmp_path, template):
    from mlx_mtp import stream_generate
    from mlx_mtp.loading import load, load_tokenizer

    marker = tmp_path / "template-ran"
    folder = _copy(TARGET, tmp_path / "m")
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = template.replace("{marker}", str(marker))
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    model, _ = load(str(TARGET))
    tok = load_tokenizer(folder)
    with pytest.raises(GenerationError) as e:
        stream_generate(model, tok, "hello")
    assert "chat template" in str(e.value) and "--no-chat-template" in str(e.value)
    assert not marker.exists()
    # The raw prompt still works (what the message suggests).
    assert next(stream_generate(model, tok, "hello", chat_template=False, max_tokens=1)).token >= 0


def test_templates_render_in_an_immutable_sandbox():
    """Which sandbox: transformers compiles chat templates in ImmutableSandboxedEnvironment."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils import chat_template_utils

    template = chat_template_utils._compile_jinja_template("{{ messages[0]['content'] }}")
    assert isinstance(template.environment, ImmutableSandboxedEnvironment)
