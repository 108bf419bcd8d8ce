"""Load Gemma 4 targets and Gemma 4 assistant drafters (and their tokenizers).

A model folder holds ``config.json``, ``*.safetensors`` (optionally with
``model.safetensors.index.json``) and the tokenizer files.  The class is
picked by ``model_type`` only: the target types of ``models.gemma4`` and the
assistant types of ``models.gemma4_assistant``.  Three layouts load:

* HF originals (``Gemma4ForCausalLM`` / ``Gemma4ForConditionalGeneration`` /
  ``Gemma4AssistantForCausalLM`` as ``save_pretrained`` writes them);
* MLX conversions written by ``mlx_mtp.convert`` or mlx-lm / mlx-vlm
  (``language_model.model.*`` keys, affine-quantized modules with per-module
  overrides in the ``quantization`` block of ``config.json``).

Everything a user can get wrong raises an ``MtpError`` subclass whose message
says what is wrong and what to do; checkpoints are validated (safe shard
names, safetensors headers, tensor names, shapes and dtypes) before any
weight reaches the model.  Weights are never read from pickle files.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError, ModelConfigError, ModelNotFoundError, MtpError

PathLike = Union[str, Path]

INDEX_FILE = "model.safetensors.index.json"
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    INDEX_FILE,
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "*.jinja",
]
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Non-affine MLX modes each allow exactly one (bits, group_size) pair.
_FIXED_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
SUPPORTED_MODES = ("affine",) + tuple(_FIXED_MODES)
DTYPES = {
    "float32": mx.float32,
    "fp32": mx.float32,
    "float16": mx.float16,
    "fp16": mx.float16,
    "bfloat16": mx.bfloat16,
    "bf16": mx.bfloat16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


# ---------------------------------------------------------------------------
# paths, configs


# Fixed names (tests check them against the model modules), so that telling a target
# from a drafter needs no model code: a wrong folder is refused before anything heavy loads.
TARGET_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
ASSISTANT_MODEL_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


def _target_types() -> Tuple[str, ...]:
    return TARGET_MODEL_TYPES


def _assistant_types() -> Tuple[str, ...]:
    return ASSISTANT_MODEL_TYPES


def _looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return False


def get_model_path(path_or_repo: PathLike) -> Path:
    """Return a local folder for ``path_or_repo`` (an existing path or a hub id ``owner/name``).

    A hub id is fetched with ``huggingface_hub.snapshot_download`` (config,
    safetensors and tokenizer files only); with ``HF_HUB_OFFLINE=1`` only the
    local hub cache is used.
    """
    if isinstance(path_or_repo, Path):
        text = str(path_or_repo)
    elif isinstance(path_or_repo, str):
        text = path_or_repo
    else:
        raise ModelNotFoundError(
            f"expected a folder path or a hub id like 'owner/name', got {type(path_or_repo).__name__}"
        )
    if not text.strip():
        raise ModelNotFoundError(
            "empty model path: pass a model folder or a hub id like 'owner/name'"
        )
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{path} is a file, not a model folder: pass the folder that holds config.json"
            )
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelNotFoundError(
                f"model folder {path} cannot be read (permission denied); fix its permissions "
                f"(e.g. chmod u+rx) or pass another folder"
            )
        return path
    if isinstance(path_or_repo, str) and _looks_like_repo_id(text):
        return _download(text)
    raise ModelNotFoundError(
        f"model folder {path} does not exist: pass an existing folder with config.json and "
        f"*.safetensors, or a Hugging Face hub id like 'owner/name'"
    )


def _download(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ModelNotFoundError(
            f"{repo!r} is not a local folder and huggingface_hub is not installed to fetch it; "
            f"pip install huggingface_hub or pass a local folder"
        ) from e
    offline = _hub_offline()
    try:
        local = snapshot_download(repo, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline)
    except Exception as e:  # every hub failure is a "cannot get this model" for the user
        kind = type(e).__name__
        if offline:
            why = "HF_HUB_OFFLINE is set and it is not in the local hub cache"
            fix = (
                "download it first (e.g. `hf download "
                f"{repo}` with network access), unset HF_HUB_OFFLINE, or pass a local folder"
            )
        elif "RepositoryNotFound" in kind or "GatedRepo" in kind:
            why = "the hub says it does not exist or you have no access to it"
            fix = "check the spelling, log in with `hf auth login` for gated repos, or pass a local folder"
        else:
            why = f"it could not be downloaded ({kind}: {str(e).splitlines()[0] if str(e) else ''})"
            fix = (
                "check your network connection, download it beforehand, set HF_HUB_OFFLINE=1 to use "
                "the local cache, or pass a local folder"
            )
        raise ModelNotFoundError(
            f"model repo {repo!r} is not available (and there is no local folder of that name): {why}; {fix}"
        ) from None
    return Path(local)


def _read_json(file: Path, what: str, error=ModelConfigError) -> Any:
    try:
        with open(file, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{what} {file} is not valid JSON ({e}); restore or re-download it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(
            f"cannot read {what} {file} ({e}); check the file and its permissions"
        ) from None


def read_config(path: PathLike) -> dict:
    """``config.json`` of a model folder as a dict (validated to be a JSON object)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    file = folder / "config.json"
    if not file.is_file():
        raise ModelConfigError(
            f"{folder} has no config.json: pass the folder of a Gemma 4 checkpoint (config.json + *.safetensors)"
        )
    config = _read_json(file, "config file")
    if not isinstance(config, dict):
        raise ModelConfigError(f"{file} must hold a JSON object, found {type(config).__name__}")
    return config


def load_generation_config(path: PathLike) -> dict:
    """``generation_config.json`` as a dict, ``{}`` when the folder has none."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    data = _read_json(file, "generation config")
    if not isinstance(data, dict):
        raise ModelConfigError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


def model_kind(config: dict) -> str:
    """``"target"`` or ``"drafter"`` from ``config["model_type"]``; anything else is refused."""
    model_type = config.get("model_type")
    targets, drafters = _target_types(), _assistant_types()
    supported = ", ".join(targets + drafters)
    if not model_type:
        raise ModelConfigError(
            f"config.json has no model_type; mlx-mtp supports Gemma 4 models ({supported}): "
            f"restore the config.json of the checkpoint"
        )
    if model_type in targets:
        return "target"
    if model_type in drafters:
        return "drafter"
    raise ModelConfigError(
        f"unsupported model_type {model_type!r} in config.json; mlx-mtp supports Gemma 4 "
        f"targets ({', '.join(targets)}) and Gemma 4 assistant drafters ({', '.join(drafters)}): "
        f"pass a Gemma 4 checkpoint"
    )


def model_class(config: dict) -> Tuple[type, Callable[[dict], Any]]:
    """(model class, config parser) for this config's ``model_type``."""
    if model_kind(config) == "target":
        from .models.gemma4 import Model, TextConfig

        return Model, TextConfig.from_dict
    from .models.gemma4_assistant import AssistantConfig, Drafter

    return Drafter, AssistantConfig.from_dict


def build_model(config: dict) -> nn.Module:
    """An uninitialised model for ``config`` (random weights)."""
    cls, parse = model_class(config)
    try:
        cfg = parse(config)
    except MtpError:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ModelConfigError(
            f"config.json does not describe a valid {config.get('model_type')} model ({type(e).__name__}: {e})"
        ) from None
    return cls(cfg)


def _sanitize_key_fn(cls: type) -> Callable[[str], Optional[str]]:
    fn = getattr(cls, "sanitize_key", None)
    return fn if callable(fn) else (lambda k: k)


def parse_dtype(dtype: Any) -> Optional[mx.Dtype]:
    """``"float32" | "float16" | "bfloat16"`` (or an ``mx.Dtype``) -> ``mx.Dtype``; ``None`` keeps."""
    if dtype is None:
        return None
    if isinstance(dtype, mx.Dtype):
        if dtype in (mx.float32, mx.float16, mx.bfloat16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise MtpError(
        f"unsupported dtype {dtype!r}: use one of float32, float16, bfloat16 (or None to keep)"
    )


# ---------------------------------------------------------------------------
# safetensors files


def _check_shard_name(folder: Path, name: Any, index_file: Path) -> Path:
    bad = (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
        or Path(name).name != name
        or not name.endswith(".safetensors")
    )
    if not bad:
        candidate = folder / name
        # Lexical check (symlinked files, as in the hub cache, are fine).
        bad = os.path.dirname(os.path.normpath(candidate)) != os.path.normpath(folder)
    if bad:
        raise CheckpointError(
            f"{index_file} names the weight file {name!r}, which is not a plain *.safetensors file name "
            f"inside the model folder; refusing to read it (fix or remove the index file)"
        )
    return folder / name


def weight_files(path: PathLike) -> List[Path]:
    """The safetensors files of a model folder (from the index when there is one)."""
    folder = Path(path)
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        index = _read_json(index_file, "weight index", CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index_file} has no 'weight_map' object; restore it or delete it so the "
                f"*.safetensors files are used directly"
            )
        files: List[Path] = []
        for name in dict.fromkeys(weight_map.values()):
            file = _check_shard_name(folder, name, index_file)
            if not file.is_file():
                raise CheckpointError(
                    f"weight shard {name} listed in {index_file.name} is missing from {folder}; "
                    f"download the complete checkpoint again"
                )
            files.append(file)
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} only has PyTorch pickle weights ({', '.join(pickles[:3])}); mlx-mtp reads "
            f"*.safetensors only (pickles can run code): re-save the model with transformers "
            f"`save_pretrained(..., safe_serialization=True)` or convert it to safetensors"
        )
    raise CheckpointError(
        f"{folder} has no *.safetensors weight files; download or convert the weights"
    )


def read_safetensors_header(file: PathLike) -> Dict[str, dict]:
    """Parse and validate a safetensors header without reading the data.

    Checks that the header length fits in the file, that the header is JSON
    and that every tensor's data range lies inside the file and matches its
    dtype and shape.
    """
    file = Path(file)

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"weight file {file} is truncated or corrupt ({why}); download or convert it again"
        )

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise corrupt(f"header length {n} does not fit in the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read weight file {file} ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            if not (0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for tensor {name}") from None
        if end > data_size:
            raise corrupt(
                f"tensor {name} ends at byte {end} but the file only has {data_size} data bytes"
            )
        itemsize = _SAFETENSORS_DTYPES.get(dtype)
        if itemsize is not None and count * itemsize != end - begin:
            raise corrupt(f"tensor {name} has {end - begin} bytes for shape {shape} of {dtype}")
        tensors[name] = info
    return tensors


def load_weight_files(path: PathLike) -> Dict[str, mx.array]:
    """All tensors of a model folder, validated, keyed by their checkpoint names."""
    folder = Path(path)
    files = weight_files(folder)
    index_file = folder / INDEX_FILE
    index_map = None
    if index_file.is_file():
        index_map = _read_json(index_file, "weight index", CheckpointError)["weight_map"]
    headers = {f: read_safetensors_header(f) for f in files}
    if index_map is not None:
        for key, name in index_map.items():
            if key not in headers[folder / name]:
                raise CheckpointError(
                    f"{index_file.name} says tensor {key} is in {name}, but that file does not contain it; "
                    f"download the complete checkpoint again"
                )
    weights: Dict[str, mx.array] = {}
    origin: Dict[str, Path] = {}
    for file in files:
        try:
            tensors = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(
                f"cannot load weight file {file} ({type(e).__name__}: {e}); it is corrupt or not "
                f"a safetensors file: download or convert it again"
            ) from None
        for key, value in tensors.items():
            if index_map is not None and index_map.get(key, os.path.basename(file)) != file.name:
                continue  # the index assigns this tensor to another file
            if key in weights:
                raise CheckpointError(
                    f"tensor {key} appears in both {origin[key].name} and {file.name}; "
                    f"remove the stray file or add a {INDEX_FILE}"
                )
            weights[key] = value
            origin[key] = file
    return weights


# ---------------------------------------------------------------------------
# quantization


def quantization_block(config: dict) -> Optional[dict]:
    """The MLX quantization block of a config (``quantization`` or an mlx-style ``quantization_config``)."""
    block = config.get("quantization")
    if block is None:
        qc = config.get("quantization_config")
        if qc is None and isinstance(config.get("text_config"), dict):
            qc = config["text_config"].get("quantization_config")
        if qc is not None:
            if (
                isinstance(qc, dict)
                and "quant_method" not in qc
                and "bits" in qc
                and "group_size" in qc
            ):
                block = qc
            else:
                method = qc.get("quant_method") if isinstance(qc, dict) else qc
                raise ModelConfigError(
                    f"unsupported quantization method {method!r} in config.json; mlx-mtp loads unquantized "
                    f"or MLX-quantized (affine) checkpoints: use the unquantized model and "
                    f"`python -m mlx_mtp.convert -q`"
                )
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ModelConfigError("the quantization block of config.json must be an object")
    _validate_qparams(block, "config.json quantization block")
    return block


_REQUANTIZE = (
    "restore the config.json that came with these weights, or quantize the unquantized model "
    "again with `python -m mlx_mtp.convert -q --q-bits B --q-group-size G`"
)
_MISMATCH = (
    "the weights do not match config.json: use the config.json that came with these weights, "
    "or download or convert the checkpoint again"
)


def _validate_qparams(params: dict, where: str) -> Tuple[int, int, str]:
    bits, group, mode = params.get("bits"), params.get("group_size"), params.get("mode", "affine")
    if mode not in SUPPORTED_MODES:
        raise ModelConfigError(
            f"{where}: unsupported quantization mode {mode!r} (supported: {', '.join(SUPPORTED_MODES)}); "
            f"{_REQUANTIZE}"
        )
    if mode == "affine":
        if bits not in SUPPORTED_BITS:
            raise ModelConfigError(
                f"{where}: unsupported bits {bits!r} (supported: {', '.join(map(str, SUPPORTED_BITS))}); "
                f"{_REQUANTIZE}"
            )
        if group not in SUPPORTED_GROUP_SIZES:
            raise ModelConfigError(
                f"{where}: unsupported group_size {group!r} (supported: {', '.join(map(str, SUPPORTED_GROUP_SIZES))}); "
                f"{_REQUANTIZE}"
            )
    elif (bits, group) != _FIXED_MODES[mode]:
        want_bits, want_group = _FIXED_MODES[mode]
        raise ModelConfigError(
            f"{where}: mode {mode} needs bits {want_bits} and group_size {want_group}, got {bits} and {group}; "
            f"{_REQUANTIZE}"
        )
    return bits, group, mode


def _quant_overrides(block: dict, sanitize_key: Callable[[str], Optional[str]]) -> Dict[str, Any]:
    """Per-module entries of a quantization block, keyed by our module paths."""
    out: Dict[str, Any] = {}
    for key, value in block.items():
        if key in ("group_size", "bits", "mode") or not isinstance(value, (dict, bool)):
            continue
        ours = sanitize_key(key)
        if ours is None:
            continue  # e.g. a vision-tower module we drop
        if isinstance(value, dict):
            value = {
                "group_size": value.get("group_size", block["group_size"]),
                "bits": value.get("bits", block["bits"]),
                "mode": value.get("mode", block.get("mode", "affine")),
            }
            _validate_qparams(value, f"config.json quantization override for {key}")
        out[ours] = value
    return out


def implied_qparams(path: str, module: nn.Module, weights: Dict[str, mx.array]) -> Tuple[int, int]:
    """(bits, group_size) implied by the packed weight and scales of an unquantized ``module``."""
    in_dims = module.weight.shape[-1]
    w, s = weights.get(f"{path}.weight"), weights[f"{path}.scales"]
    if w is None:
        raise CheckpointError(
            f"checkpoint has {path}.scales but no {path}.weight; the checkpoint is incomplete"
        )
    n_groups = s.shape[-1] if s.ndim else 0
    if n_groups == 0 or in_dims % n_groups or (w.shape[-1] * 32) % in_dims:
        raise CheckpointError(
            f"quantized tensors of {path} do not fit its input size {in_dims}: weight {tuple(w.shape)}, "
            f"scales {tuple(s.shape)}; {_MISMATCH}"
        )
    return (w.shape[-1] * 32) // in_dims, in_dims // n_groups


def apply_quantization(
    model: nn.Module,
    config: dict,
    weights: Dict[str, mx.array],
    sanitize_key: Callable[[str], Optional[str]] = lambda k: k,
) -> None:
    """Quantize exactly the modules that have ``.scales`` in ``weights`` (in place)."""
    block = quantization_block(config)
    quantized = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    if block is None:
        if quantized:
            raise CheckpointError(
                f"the weights are quantized (e.g. {quantized[0]}.scales) but config.json has no "
                f"'quantization' block; restore the config.json that came with these weights"
            )
        return
    default = {
        "group_size": block["group_size"],
        "bits": block["bits"],
        "mode": block.get("mode", "affine"),
    }
    overrides = _quant_overrides(block, sanitize_key)

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            raise CheckpointError(
                f"checkpoint has quantized tensors for {path} ({type(module).__name__}), which cannot be quantized"
            )
        params = overrides.get(path, default)
        if params is False:
            raise CheckpointError(
                f"config.json marks {path} as not quantized but the checkpoint has {path}.scales; "
                f"the config does not match the weights"
            )
        if params is True:
            params = default
        bits, group = implied_qparams(path, module, weights)
        if (bits, group) != (params["bits"], params["group_size"]):
            raise CheckpointError(
                f"config.json quantizes {path} with bits={params['bits']}, group_size={params['group_size']} "
                f"but its tensors imply bits={bits}, group_size={group}; the quantization block does not "
                f"match the weights (restore the matching config.json)"
            )
        return dict(params)

    nn.quantize(
        model,
        default["group_size"],
        default["bits"],
        mode=default["mode"],
        class_predicate=predicate,
    )


# ---------------------------------------------------------------------------
# weights -> model


def _shape(a) -> Tuple[int, ...]:
    return tuple(int(d) for d in a.shape)


def _is_float(dtype: mx.Dtype) -> bool:
    return mx.issubdtype(dtype, mx.floating)


def check_weights(
    model: nn.Module,
    weights: Dict[str, mx.array],
    dtype: Optional[mx.Dtype] = None,
    source: str = "checkpoint",
    names: Optional[Dict[str, str]] = None,
) -> Dict[str, mx.array]:
    """Compare names/shapes/dtypes with the model's parameters; return (cast) weights.

    Float tensors keep the checkpoint dtype unless ``dtype`` is given; integer
    tensors are never touched.  ``names`` maps our tensor names to the
    checkpoint's (for messages).
    """
    names = names or {}

    def label(k: str) -> str:
        orig = names.get(k)
        return f"{k} ({orig} in the checkpoint)" if orig and orig != k else k

    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing:
        k = missing[0]
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{'...' if len(missing) > 4 else ''})"
        raise CheckpointError(
            f"{source} is missing tensor {k} (expected shape {_shape(params[k])})"
            f"{more if len(missing) > 1 else ''}; {_MISMATCH}"
        )
    if unexpected:
        k = unexpected[0]
        more = f" (and {len(unexpected) - 1} more: {', '.join(unexpected[1:4])}{'...' if len(unexpected) > 4 else ''})"
        raise CheckpointError(
            f"{source} has unexpected tensor {label(k)} with shape {_shape(weights[k])} that the model "
            f"described by config.json does not have{more if len(unexpected) > 1 else ''}; "
            f"{_MISMATCH}"
        )
    out = {}
    for k, p in params.items():
        w = weights[k]
        if _shape(w) != _shape(p):
            raise CheckpointError(
                f"tensor {label(k)} has shape {_shape(w)} in the {source} but the model expects {_shape(p)}; "
                f"{_MISMATCH}"
            )
        pf, wf = _is_float(p.dtype), _is_float(w.dtype)
        if pf != wf:
            raise CheckpointError(
                f"tensor {label(k)} has dtype {w.dtype} in the {source} but the model expects a "
                f"{'floating-point' if pf else 'integer'} tensor ({p.dtype}); the checkpoint is broken: "
                f"download or convert it again"
            )
        if not pf and p.dtype == mx.uint32 and w.dtype != mx.uint32:
            raise CheckpointError(
                f"quantized tensor {label(k)} has dtype {w.dtype} in the {source}, expected uint32; "
                f"the checkpoint is broken: download or convert it again"
            )
        if pf and dtype is not None and w.dtype != dtype:
            w = w.astype(dtype)
        out[k] = w
    return out


def load_model(path: PathLike, *, dtype: Any = None, lazy: bool = False) -> nn.Module:
    """Load a Gemma 4 target or assistant drafter from a folder or hub id."""
    want = parse_dtype(dtype)
    folder = get_model_path(path)
    config = read_config(folder)
    model_kind(config)  # an unsupported model_type is refused first
    raw = load_weight_files(folder)  # file-level problems next, before any model code runs
    model = build_model(config)
    try:
        weights = model.sanitize(raw)
    except MtpError:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"the weights in {folder} do not fit the model of config.json ({type(e).__name__}: {e})"
        ) from None
    sanitize_key = _sanitize_key_fn(type(model))
    names = {}
    for key in raw:
        try:
            ours = sanitize_key(key)
        except Exception:  # a naming helper must never hide the real error
            ours = None
        if ours is not None:
            names.setdefault(ours, key)
    apply_quantization(model, config, weights, sanitize_key)
    weights = check_weights(model, weights, want, source=f"checkpoint {folder}", names=names)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------------------
# tokenizer, stop tokens


def has_tokenizer(path: PathLike) -> bool:
    folder = Path(path)
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _as_id_list(value: Any) -> List[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def config_eos_ids(path: PathLike) -> List[int]:
    """eos ids named by generation_config.json, then config.json (top level and text_config)."""
    folder = Path(path)
    ids = _as_id_list(load_generation_config(folder).get("eos_token_id"))
    config = read_config(folder)
    ids += _as_id_list(config.get("eos_token_id"))
    if isinstance(config.get("text_config"), dict):
        ids += _as_id_list(config["text_config"].get("eos_token_id"))
    return list(dict.fromkeys(ids))


def load_tokenizer(path: PathLike, *, eos_token_ids: Optional[Iterable[int]] = None):
    """mlx-lm ``TokenizerWrapper`` for a folder (or hub id); eos ids default to the configs'."""
    folder = get_model_path(path)
    if not has_tokenizer(folder):
        raise ModelConfigError(
            f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json); copy the tokenizer "
            f"files of the original checkpoint into it"
        )
    if eos_token_ids is None:
        eos_token_ids = config_eos_ids(folder) if (folder / "config.json").is_file() else []
    from mlx_lm.tokenizer_utils import load as _load

    try:
        return _load(folder, eos_token_ids=list(eos_token_ids))
    except MtpError:
        raise
    except Exception as e:
        raise ModelConfigError(
            f"cannot load the tokenizer in {folder} ({type(e).__name__}: {e}); restore the tokenizer files"
        ) from None


def stop_token_ids(path: PathLike, tokenizer=None) -> Set[int]:
    """Union of generation_config eos ids, config eos ids and the tokenizer's eos ids."""
    folder = get_model_path(path)
    ids = set(config_eos_ids(folder))
    if tokenizer is not None:
        ids |= {int(i) for i in (getattr(tokenizer, "eos_token_ids", None) or [])}
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
    return ids


def load(path_or_repo: PathLike, *, dtype: Any = None) -> Tuple[nn.Module, Any]:
    """(model, tokenizer) for a Gemma 4 target or drafter folder / hub id.

    A drafter folder without tokenizer files gives ``tokenizer=None``; a
    target needs one.
    """
    folder = get_model_path(path_or_repo)
    kind = model_kind(read_config(folder))
    model = load_model(folder, dtype=dtype)
    if kind == "drafter" and not has_tokenizer(folder):
        return model, None
    return model, load_tokenizer(folder)
