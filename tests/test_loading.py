"""mlx_mtp.loading: layouts that must load, and every way a checkpoint folder can be wrong.

Offline and fast: the trained tiny pair in ``shared/models`` plus tiny random HF fixtures from
``tests/hf_ref.py`` (session fixtures of ``conftest.py``).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_mtp.errors import CheckpointError, ModelConfigError, ModelNotFoundError, MtpError
from mlx_mtp.loading import (
    get_model_path,
    load,
    load_generation_config,
    load_model,
    load_tokenizer,
    read_config,
    stop_token_ids,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
TARGET = SHARED / "tiny-gemma4-code"
DRAFTER = SHARED / "tiny-gemma4-code-assistant"

needs_shared = pytest.mark.skipif(
    not TARGET.is_dir(), reason=f"trained tiny models not found at {SHARED}"
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(folder: Path, fn) -> None:
    """Load model.safetensors, let ``fn`` edit the dict, save it back."""
    file = folder / "model.safetensors"
    w = dict(mx.load(str(file)))
    fn(w)
    file.unlink()
    mx.save_safetensors(str(file), w, metadata={"format": "pt"})


def _logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


# --------------------------------------------------------------------------------------------------------
# layouts that load


@needs_shared
def test_trained_pair_loads_with_tokenizers_and_stop_ids():
    model, tok = load(str(TARGET))
    assert type(model).__name__ == "Model"
    ids = tok.encode("import os\n")
    assert ids[0] == 2  # <bos> prepended
    out = model(mx.array([ids]))
    assert out.dtype == mx.bfloat16  # checkpoint dtype kept
    assert out.shape == (1, len(ids), 4096)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert stop_token_ids(TARGET, tok) == {1}
    assert load_generation_config(TARGET)["eos_token_id"] == 1

    drafter, dtok = load(str(DRAFTER))
    assert type(drafter).__name__ == "Drafter"
    assert dtok is not None and dtok.encode("import os\n") == ids
    order = drafter.masked_embedding.token_ordering
    assert mx.issubdtype(order.dtype, mx.integer)
    assert sorted(np.array(order).tolist()) == list(
        range(4096)
    )  # a permutation, untouched by casting


@needs_shared
def test_dtype_option_casts_floats_only():
    m32 = load_model(TARGET, dtype="float32")
    assert m32(mx.array([[2, 5, 6]])).dtype == mx.float32
    d32 = load_model(DRAFTER, dtype="float32")
    assert d32.pre_projection.weight.dtype == mx.float32
    assert mx.issubdtype(d32.masked_embedding.token_ordering.dtype, mx.integer)
    with pytest.raises(MtpError, match="unsupported dtype"):
        load_model(TARGET, dtype="int8")


def test_hf_multimodal_layout_matches_transformers(hf, hf_e2b):
    """Gemma4ForConditionalGeneration keys (model.language_model.*, towers present), float32 -> float32 logits."""
    model = load_model(hf_e2b)
    ids = hf.random_ids(12, hf.TARGET_TEXT_CONFIGS["e2b"]["vocab_size"], seed=3)
    got = model(mx.array([ids]))
    assert got.dtype == mx.float32
    ref = hf.hf_target_forward(hf_e2b, ids)["logits"]
    np.testing.assert_allclose(np.array(got)[0], ref, atol=2e-4, rtol=0)


def test_hf_text_only_layout_matches_transformers(hf, tmp_path):
    """Gemma4ForCausalLM keys (model.*) with transformers 5.23's per_layer_config (no global_head_dim)."""
    path = hf.build_target("text", tmp_path / "text-hf", seed=1, config_style="hf", tokenizer=True)
    cfg = read_config(path)
    assert "global_head_dim" not in cfg and "per_layer_config" in cfg
    model, tok = load(str(path))
    ids = hf.random_ids(10, hf.TARGET_TEXT_CONFIGS["text"]["vocab_size"], seed=4)
    ref = hf.hf_target_forward(path, ids)["logits"]
    np.testing.assert_allclose(_logits(model, ids), ref, atol=2e-4, rtol=0)
    assert tok is not None


def test_hf_assistant_layout_loads_exact_tensors(hf, hf_text_assistant):
    drafter, _ = load(str(hf_text_assistant))
    saved = mx.load(str(hf_text_assistant / "model.safetensors"))
    assert mx.array_equal(drafter.pre_projection.weight, saved["pre_projection.weight"]).item()
    assert mx.array_equal(
        drafter.model.layers[0].self_attn.q_proj.weight,
        saved["model.layers.0.self_attn.q_proj.weight"],
    ).item()
    assert np.array_equal(
        np.array(drafter.masked_embedding.token_ordering),
        np.array(saved["masked_embedding.token_ordering"]),
    )


@pytest.fixture(scope="module")
def mlx_community_moe(hf_26b, tmp_path_factory):
    """A tiny 26B-like MoE converted by mlx-lm itself: model_type gemma4, language_model.model.* keys,
    4-bit affine (group 64) with 8-bit router.proj overrides -- the mlx-community layout."""
    from mlx_lm.convert import convert as mlx_lm_convert

    root = tmp_path_factory.mktemp("mlx_community")
    src = _copy(hf_26b, root / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = cfg["text_config"][
        "vocab_size"
    ]  # mlx-lm's wrapper reads the vocab at top level
    (src / "config.json").write_text(json.dumps(cfg))
    out = root / "gemma-4-26b-a4b-it-4bit"
    # float32: MLX's CPU gather_mm (unquantized expert down_proj, 32 inputs < group 64) is float32-only
    mlx_lm_convert(str(src), str(out), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    return out


def test_mlx_community_layout_loads_and_matches_mlx_lm(mlx_community_moe, hf_26b):
    import mlx_lm

    cfg = read_config(mlx_community_moe)
    q = cfg["quantization"]
    assert cfg["model_type"] == "gemma4" and (q["bits"], q["group_size"]) == (4, 64)
    assert q["language_model.model.layers.3.router.proj"] == {"group_size": 64, "bits": 8}
    keys = mx.load(str(mlx_community_moe / "model.safetensors")).keys()
    assert all(k.startswith("language_model.model.") for k in keys)

    model, _ = load(str(mlx_community_moe))
    layer = model.model.layers[3]
    assert isinstance(layer.router.proj, nn.QuantizedLinear) and layer.router.proj.bits == 8
    assert (
        isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    )
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert "scales" in layer.experts.switch_glu.gate_proj  # quantized experts (SwitchLinear)
    assert (
        "scales" not in layer.experts.switch_glu.down_proj
    )  # 32 inputs: not a multiple of 64, kept float

    ref_model, _ = mlx_lm.load(str(mlx_community_moe))
    ids = [2, 17, 99, 5, 400, 33, 8, 250, 11]
    ours, theirs = _logits(model, ids), _logits(ref_model, ids)
    diff = float(np.abs(ours - theirs).max())
    print(f"mlx-community MoE: max |ours - mlx-lm| = {diff:.3g}")
    assert diff < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


# --------------------------------------------------------------------------------------------------------
# hub ids


def test_hub_id_offline_is_model_not_found(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    repo = "mlx-community/gemma-4-e2b-it-4bit-not-cached"
    with pytest.raises(ModelNotFoundError) as e:
        load(repo)
    msg = str(e.value)
    assert repo in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg


def test_missing_local_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        get_model_path("./definitely/not/here/either")


# --------------------------------------------------------------------------------------------------------
# bad folders


@pytest.fixture
def text_copy(hf_text, tmp_path) -> Path:
    return _copy(hf_text, tmp_path / "m")


def test_no_config_json(text_copy):
    (text_copy / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_model(text_copy)


def test_invalid_config_json(text_copy):
    (text_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_model(text_copy)


def test_unsupported_model_type_names_supported(text_copy):
    _edit_config(text_copy, model_type="llama")
    with pytest.raises(ModelConfigError) as e:
        load_model(text_copy)
    msg = str(e.value)
    assert "'llama'" in msg and "gemma4_text" in msg and "gemma4_assistant" in msg


def test_only_pickle_weights_refused(text_copy):
    (text_copy / "model.safetensors").rename(text_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        load_model(text_copy)


def _split_into_index(
    folder: Path, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
):
    w = dict(mx.load(str(folder / "model.safetensors")))
    keys = sorted(w)
    half = len(keys) // 2
    parts = [{k: w[k] for k in keys[:half]}, {k: w[k] for k in keys[half:]}]
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for name, part in zip(names, parts):
        mx.save_safetensors(str(folder / name), part)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return weight_map


def test_sharded_index_loads(text_copy, hf_text):
    _split_into_index(text_copy)
    a, b = load_model(text_copy), load_model(hf_text)
    np.testing.assert_array_equal(_logits(a, [2, 3, 4]), _logits(b, [2, 3, 4]))


def test_missing_shard_named(text_copy):
    _split_into_index(text_copy)
    (text_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_model(text_copy)


@pytest.mark.parametrize(
    "evil", ["../x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors"]
)
def test_index_paths_outside_folder_refused(text_copy, evil):
    weight_map = _split_into_index(text_copy)
    outside = text_copy.parent / "x.safetensors"
    shutil.copyfile(
        text_copy / "model-00002-of-00002.safetensors", outside
    )  # exists, must still be refused
    weight_map = {k: (evil if v.startswith("model-00002") else v) for k, v in weight_map.items()}
    (text_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a plain"):
        load_model(text_copy)


def test_truncated_safetensors(text_copy):
    file = text_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_model(text_copy)


def test_garbage_safetensors_header(text_copy):
    (text_copy / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"\0" * 64)
    with pytest.raises(CheckpointError, match="header length"):
        load_model(text_copy)
    (text_copy / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"{notjson")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(text_copy)


def test_wrong_shape_names_tensor_and_both_shapes(text_copy):
    key = "model.layers.1.mlp.gate_proj.weight"

    def edit(w):
        w[key] = mx.zeros((97, w[key].shape[1]), dtype=w[key].dtype)

    _rewrite_weights(text_copy, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(text_copy)
    assert key in str(e.value) and "(97, 64)" in str(e.value) and "(96, 64)" in str(e.value)


def test_wrong_shape_in_multimodal_names_checkpoint_key(hf_e2b, tmp_path):
    folder = _copy(hf_e2b, tmp_path / "mm")
    key = "model.language_model.layers.2.self_attn.q_proj.weight"

    def edit(w):
        w[key] = w[key][:-1]

    _rewrite_weights(folder, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert key in str(e.value) and "(63, 64)" in str(e.value) and "(64, 64)" in str(e.value)


def test_missing_and_unexpected_tensors(text_copy):
    _rewrite_weights(text_copy, lambda w: w.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.norm\.weight"):
        load_model(text_copy)
    _rewrite_weights(
        text_copy,
        lambda w: w.update(
            {"model.norm.weight": mx.ones((64,)), "model.extra.weight": mx.ones((3,))}
        ),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.extra\.weight"):
        load_model(text_copy)


def test_integer_tensor_where_float_expected(text_copy):
    key = "model.layers.0.input_layernorm.weight"
    _rewrite_weights(text_copy, lambda w: w.update({key: w[key].astype(mx.int32)}))
    with pytest.raises(CheckpointError, match=f"{key}.*int32.*floating-point"):
        load_model(text_copy)


def test_quantized_weights_without_block_and_inconsistent_block(text_copy, tmp_path):
    model = load_model(text_copy)
    nn.quantize(
        model,
        64,
        4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0,
    )
    from mlx.utils import tree_flatten

    (text_copy / "model.safetensors").unlink()
    mx.save_safetensors(
        str(text_copy / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    with pytest.raises(CheckpointError, match="no 'quantization' block"):
        load_model(text_copy)
    _edit_config(text_copy, quantization={"group_size": 64, "bits": 8})
    with pytest.raises(
        CheckpointError, match="bits=8, group_size=64 but its tensors imply bits=4, group_size=64"
    ):
        load_model(text_copy)
    _edit_config(text_copy, quantization={"group_size": 32, "bits": 4})
    with pytest.raises(CheckpointError, match="imply bits=4, group_size=64"):
        load_model(text_copy)
    _edit_config(text_copy, quantization={"group_size": 64, "bits": 7})
    with pytest.raises(ModelConfigError, match="unsupported bits 7"):
        load_model(text_copy)
    _edit_config(text_copy, quantization={"group_size": 48, "bits": 4})
    with pytest.raises(ModelConfigError, match="unsupported group_size 48"):
        load_model(text_copy)
    _edit_config(text_copy, quantization={"group_size": 64, "bits": 4, "mode": "affine"})
    loaded = load_model(text_copy)
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    np.testing.assert_array_equal(_logits(loaded, [2, 7, 9]), _logits(model, [2, 7, 9]))
    # HF-style quantization configs (bitsandbytes, fp8, ...) are not MLX layouts
    cfg = json.loads((text_copy / "config.json").read_text())
    cfg.pop("quantization")
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (text_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="unsupported quantization method 'bitsandbytes'"):
        load_model(text_copy)


def test_non_affine_mode_loads(text_copy):
    """mxfp4 (fixed 4 bits / group 32, uint8 scales) as mlx-lm writes it."""
    from mlx.utils import tree_flatten

    model = load_model(text_copy)
    nn.quantize(
        model,
        32,
        4,
        mode="mxfp4",
        class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0,
    )
    (text_copy / "model.safetensors").unlink()
    mx.save_safetensors(
        str(text_copy / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    _edit_config(text_copy, quantization={"group_size": 32, "bits": 4, "mode": "mxfp4"})
    loaded = load_model(text_copy)
    assert loaded.model.layers[0].mlp.gate_proj.mode == "mxfp4"
    np.testing.assert_array_equal(_logits(loaded, [2, 7, 9]), _logits(model, [2, 7, 9]))
    _edit_config(text_copy, quantization={"group_size": 64, "bits": 4, "mode": "mxfp4"})
    with pytest.raises(ModelConfigError, match="mode mxfp4 needs bits 4 and group_size 32"):
        load_model(text_copy)


def test_tokenizer_required_for_targets_not_drafters(hf_text, hf_text_assistant, tmp_path):
    target = _copy(hf_text, tmp_path / "t")
    drafter = _copy(hf_text_assistant, tmp_path / "d")
    for folder in (target, drafter):
        for f in list(folder.iterdir()):
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                f.unlink()
    model, tok = load(str(drafter))
    assert tok is None and type(model).__name__ == "Drafter"
    with pytest.raises(ModelConfigError, match="no tokenizer"):
        load(str(target))
    with pytest.raises(ModelConfigError, match="no tokenizer"):
        load_tokenizer(target)


def test_stop_token_ids_union(hf_text, tmp_path):
    folder = _copy(hf_text, tmp_path / "t")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106, 50]}))
    _edit_config(folder, eos_token_id=[1, 7])
    tok = load_tokenizer(folder)
    assert stop_token_ids(folder, tok) == {1, 7, 50, 106}
    assert {1, 7, 50, 106} <= set(tok.eos_token_ids)
    (folder / "generation_config.json").write_text("{broken")
    with pytest.raises(ModelConfigError, match="generation config"):
        load_generation_config(folder)


def test_errors_are_value_errors():
    """Every loader error is an MtpError (a ValueError) so callers can catch one type."""
    for cls in (ModelNotFoundError, ModelConfigError, CheckpointError):
        assert issubclass(cls, MtpError) and issubclass(cls, ValueError)
