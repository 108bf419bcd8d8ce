"""mlx_mtp.convert (and the convert/convert.py script): layouts written, numerics, refusal and cleanup.

Offline and fast: the trained tiny pair in ``shared/models`` plus tiny random HF fixtures (conftest.py).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_mtp.convert as conv
from mlx_mtp.errors import ConversionError
from mlx_mtp.loading import load, load_model, read_config

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
TARGET = SHARED / "tiny-gemma4-code"
DRAFTER = SHARED / "tiny-gemma4-code-assistant"
SCRIPT = REPO / "convert" / "convert.py"

needs_shared = pytest.mark.skipif(
    not TARGET.is_dir(), reason=f"trained tiny models not found at {SHARED}"
)

PROMPTS = [
    "import os\n",
    "class Foo(object):\n    def __init__(self",
    "for i in range(10):\n",
    "from test import support\n",
]


def _logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def _greedy(model, ids, n=32):
    cache = model.make_cache()
    x, out = mx.array([ids]), []
    for _ in range(n):
        tok = int(mx.argmax(model(x, cache=cache)[0, -1]))
        out.append(tok)
        x = mx.array([[tok]])
    return out


def _entries(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def _params(model):
    return dict(tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module")
def target_tok():
    if not TARGET.is_dir():
        pytest.skip(f"trained tiny models not found at {SHARED}")
    return load(str(TARGET))


@pytest.fixture(scope="module")
def target_q4(out_root):
    if not TARGET.is_dir():
        pytest.skip(f"trained tiny models not found at {SHARED}")
    return conv.convert(
        str(TARGET), str(out_root / "tiny-4bit"), quantize=True, q_bits=4, q_group_size=64
    )


# --------------------------------------------------------------------------------------------------------
# layouts and numerics


@needs_shared
def test_unquantized_convert_is_identical(out_root, target_tok):
    ref, tok = target_tok
    dst = conv.convert(str(TARGET), str(out_root / "tiny-bf16"))
    names = _entries(dst)
    assert "model-00001-of-00001.safetensors" in names and "model.safetensors.index.json" in names
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert f in names
    cfg = read_config(dst)
    assert (
        "quantization" not in cfg
        and cfg["global_head_dim"] == 128
        and cfg["model_type"] == "gemma4_text"
    )
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    w = mx.load(str(dst / "model-00001-of-00001.safetensors"))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in w.values())
    assert set(index["weight_map"]) == set(w) and all(k.startswith("model.") for k in w)
    assert all(v.dtype == mx.bfloat16 for v in w.values())  # HF bf16 kept
    again, tok2 = load(str(dst))
    for p in PROMPTS[:2]:
        ids = tok.encode(p)
        assert tok2.encode(p) == ids
        np.testing.assert_array_equal(_logits(again, ids), _logits(ref, ids))


def test_multimodal_convert_identical_and_mlx_community_names(hf_e2b, out_root):
    import mlx_lm

    dst = conv.convert(str(hf_e2b), str(out_root / "e2b-f32"), expect="target")
    keys = mx.load(str(dst / "model-00001-of-00001.safetensors")).keys()
    assert all(k.startswith("language_model.model.") for k in keys)
    assert not any("vision" in k or "audio" in k for k in keys)
    cfg = read_config(dst)
    assert (
        cfg["model_type"] == "gemma4" and "vision_config" not in cfg and "audio_config" not in cfg
    )
    assert cfg["vocab_size"] == cfg["text_config"]["vocab_size"] == 512
    assert cfg["text_config"]["global_head_dim"] == 32
    ids = [2, 9, 77, 300, 4, 18, 500, 3]
    src, out = load_model(hf_e2b), load_model(dst)
    np.testing.assert_array_equal(_logits(out, ids), _logits(src, ids))
    theirs, _ = mlx_lm.load(str(dst))
    np.testing.assert_allclose(_logits(theirs, ids), _logits(out, ids), atol=1e-4, rtol=0)


@needs_shared
def test_4bit_close_to_bf16_and_8bit_greedy_identical(target_q4, out_root, target_tok):
    """4-bit: logits close to the bf16 model; 8-bit: greedy identical (fp32 compute for both).

    Measured on the trained tiny model (fp32 compute, these prompts): 4-bit group 64 max |diff| 1.57 (mean
    ~0.1, logits span +-30 after the soft-cap), 8-bit max 0.06.  4-bit greedy does NOT stay identical to bf16
    on this small, barely trained model: its top-2 logit gaps are often 0.04-0.26, below the 4-bit error, so
    greedy diverges after 0-11 tokens (also with embeddings kept in bf16).  8-bit stays identical for 32
    tokens on every prompt, and the 4-bit output is identical in mlx-lm and mlx-mtp (see below).
    """
    _, tok = target_tok
    ref = load_model(TARGET, dtype="float32")
    q4 = load_model(target_q4, dtype="float32")
    q8_dir = conv.convert(str(TARGET), str(out_root / "tiny-8bit"), quantize=True, q_bits=8)
    q8 = load_model(q8_dir, dtype="float32")
    d4 = d8 = 0.0
    agree = []
    for p in PROMPTS:
        ids = tok.encode(p)
        a = _logits(ref, ids)
        d4 = max(d4, float(np.abs(_logits(q4, ids) - a).max()))
        d8 = max(d8, float(np.abs(_logits(q8, ids) - a).max()))
        g = _greedy(ref, ids)
        assert _greedy(q8, ids) == g, f"8-bit greedy differs for {p!r}"
        # teacher-forced top-1 agreement of the 4-bit model along the reference continuation
        seq = ids + g
        agree.append(float((_logits(q4, seq).argmax(-1) == _logits(ref, seq).argmax(-1)).mean()))
    print(
        f"4-bit max |logit diff| {d4:.3f}, 8-bit {d8:.3f}, 4-bit teacher-forced top-1 agreement {agree}"
    )
    assert d4 < 2.5 and d8 < 0.15
    assert min(agree) >= 0.75 and np.mean(agree) >= 0.85


@needs_shared
def test_4bit_output_loads_in_mlx_lm_identically(target_q4, target_tok):
    import mlx_lm

    _, tok = target_tok
    ours = load_model(target_q4)
    theirs, _ = mlx_lm.load(str(target_q4))
    for p in PROMPTS[:2]:
        ids = tok.encode(p)
        np.testing.assert_array_equal(_logits(ours, ids), _logits(theirs, ids))


@needs_shared
def test_quantization_block_round_trips(target_q4, out_root):
    cfg = read_config(target_q4)
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert cfg["quantization_config"] == cfg["quantization"]
    model = load_model(target_q4)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)  # tied head quantized too
    assert not isinstance(model.model.norm, nn.QuantizedLinear)
    # copying an MLX-quantized folder keeps the block and every tensor
    copy = conv.convert(str(target_q4), str(out_root / "tiny-4bit-copy"))
    assert read_config(copy)["quantization"] == cfg["quantization"]
    a, b = _params(model), _params(load_model(copy))
    assert set(a) == set(b) and all(
        mx.array_equal(a[k], b[k]).item() and a[k].dtype == b[k].dtype for k in a
    )
    with pytest.raises(ConversionError, match="already quantized"):
        conv.convert(str(target_q4), str(out_root / "twice"), quantize=True)
    assert not (out_root / "twice").exists()


def test_moe_router_overrides_written_and_read(hf_26b, out_root):
    import mlx_lm

    dst = conv.convert(str(hf_26b), str(out_root / "moe-4bit"), quantize=True)
    q = read_config(dst)["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 64, "affine")
    routers = {k: v for k, v in q.items() if isinstance(v, dict)}
    assert routers == {
        f"language_model.model.layers.{i}.router.proj": {"group_size": 64, "bits": 8}
        for i in range(6)
    }
    model = load_model(dst)
    layer = model.model.layers[2]
    assert layer.router.proj.bits == 8 and layer.self_attn.q_proj.bits == 4
    assert (
        "scales" not in layer.experts.switch_glu.down_proj
    )  # 32 inputs: not divisible by 64, kept float
    assert layer.router.scale.dtype == mx.float32 and "scales" not in layer.input_layernorm
    ids = [2, 30, 31, 400, 5]
    theirs, _ = mlx_lm.load(str(dst))
    np.testing.assert_allclose(_logits(theirs, ids), _logits(model, ids), atol=1e-3, rtol=0)


def test_drafter_convert_keeps_ids_and_names(hf_text_assistant, out_root):
    plain = conv.convert(str(hf_text_assistant), str(out_root / "drafter-f32"), expect="drafter")
    a, b = _params(load_model(hf_text_assistant)), _params(load_model(plain))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    dst = conv.convert(
        str(hf_text_assistant),
        str(out_root / "drafter-4bit"),
        quantize=True,
        q_group_size=32,
        dtype="bfloat16",
    )
    w = mx.load(str(dst / "model-00001-of-00001.safetensors"))
    assert "pre_projection.scales" in w and "model.layers.0.self_attn.q_proj.scales" in w
    assert "masked_embedding.centroids.weight" in w and "masked_embedding.centroids.scales" not in w
    assert mx.issubdtype(w["masked_embedding.token_ordering"].dtype, mx.integer)
    assert not any(k.startswith("language_model") for k in w)
    assert w["model.norm.weight"].dtype == mx.bfloat16
    drafter, tok = load(str(dst))
    assert tok is not None
    np.testing.assert_array_equal(
        np.array(drafter.masked_embedding.token_ordering),
        np.array(load_model(hf_text_assistant).masked_embedding.token_ordering),
    )
    cfg = read_config(dst)
    assert (
        cfg["model_type"] == "gemma4_assistant"
        and cfg["dtype"] == "bfloat16"
        and cfg["quantization"]["bits"] == 4
    )


def test_multiple_shards(hf_text, tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 64 * 1024)
    dst = conv.convert(str(hf_text), str(tmp_path / "sharded"))
    shards = [n for n in _entries(dst) if n.endswith(".safetensors")]
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    a, b = load_model(hf_text), load_model(dst)
    np.testing.assert_array_equal(_logits(a, [2, 5, 6]), _logits(b, [2, 5, 6]))


# --------------------------------------------------------------------------------------------------------
# CLI, refusals, cleanup


def _run_main(argv, capsys):
    rc = conv.main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")], err


def test_unsupported_q_bits_and_options(hf_text, tmp_path, capsys):
    dst = tmp_path / "x"
    rc, errors, _ = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(dst), "-q", "--q-bits", "7"], capsys
    )
    assert rc == 2 and len(errors) == 1 and "2, 3, 4, 5, 6, 8" in errors[0]
    rc, errors, _ = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(dst), "--dtype", "int8"], capsys
    )
    assert rc == 2 and "float32, float16, bfloat16" in errors[0]
    rc, errors, _ = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(dst), "--q-group-size", "48"], capsys
    )
    assert rc == 2 and "32, 64, 128" in errors[0]
    rc, errors, _ = _run_main(
        ["--hf-path", str(tmp_path / "missing"), "--mlx-path", str(dst)], capsys
    )
    assert rc == 2 and "does not exist" in errors[0]
    assert not dst.exists()


def test_existing_dst_needs_force_and_force_replaces(hf_text, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    rc, errors, _ = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(dst), "--quiet"], capsys
    )
    assert rc == 2 and "already exists" in errors[0] and "--force" in errors[0]
    assert _entries(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"
    rc, errors, err = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(dst), "--force"], capsys
    )
    assert rc == 0 and not errors and "[convert]" in err  # progress on stderr
    assert "keep.txt" not in _entries(dst) and "config.json" in _entries(dst)
    assert _entries(tmp_path) == ["out"]  # no temp or backup folder left
    with pytest.raises(ConversionError, match="overlaps the source"):
        conv.convert(str(dst), str(dst / "inner"))


def test_kind_mismatch_refused(hf_text, hf_text_assistant, tmp_path, capsys):
    rc, errors, _ = _run_main(
        [
            "--hf-path",
            str(hf_text_assistant),
            "--mlx-path",
            str(tmp_path / "a"),
            "--expect",
            "target",
        ],
        capsys,
    )
    assert rc == 2 and "assistant drafter" in errors[0] and "target" in errors[0]
    rc, errors, _ = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(tmp_path / "b"), "--expect", "drafter"],
        capsys,
    )
    assert rc == 2 and "target model" in errors[0] and "drafter was expected" in errors[0]
    assert _entries(tmp_path) == []


def test_interrupt_while_saving_leaves_nothing(hf_text, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(file, tensors, metadata):
        calls.append(file)
        if len(calls) == 2:  # after one shard was written
            raise KeyboardInterrupt
        mx.save_safetensors(file, tensors, metadata=metadata)

    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 64 * 1024)
    monkeypatch.setattr(conv, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(str(hf_text), str(tmp_path / "nested" / "out"))
    assert (
        len(calls) == 2 and _entries(tmp_path) == []
    )  # temp folder and the created parent removed
    calls.clear()
    rc, errors, _ = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(tmp_path / "out")], capsys
    )
    assert rc == 130 and "interrupted" in errors[0]
    assert _entries(tmp_path) == []


def test_disk_full_leaves_nothing_and_keeps_old_dst(hf_text, tmp_path, monkeypatch, capsys):
    def full(file, tensors, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", file)

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text('{"old": true}')
    monkeypatch.setattr(conv, "save_safetensors", full)
    with pytest.raises(ConversionError, match="disk full"):
        conv.convert(str(hf_text), str(dst), force=True)
    rc, errors, _ = _run_main(
        ["--hf-path", str(hf_text), "--mlx-path", str(dst), "--force"], capsys
    )
    assert rc == 2 and "disk full" in errors[0]
    assert _entries(tmp_path) == ["out"] and _entries(dst) == ["config.json"]
    assert json.loads((dst / "config.json").read_text()) == {"old": True}


def test_script_is_importable_by_path_and_runs(hf_text, tmp_path):
    spec = importlib.util.spec_from_file_location("mlx_mtp_convert_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing must not run a conversion
    assert module.main is conv.main and module.setup_arg_parser is conv.setup_arg_parser
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--hf-path",
            str(hf_text),
            "--mlx-path",
            str(tmp_path / "o"),
            "-q",
            "--q-bits",
            "3",
            "--q-group-size",
            "16",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unsupported --q-group-size 16"), (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
