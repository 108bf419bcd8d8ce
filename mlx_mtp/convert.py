"""Convert a Gemma 4 target or assistant drafter to the MLX (mlx-community) layout.

Usage::

    python -m mlx_mtp.convert --hf-path SRC --mlx-path DST [-q --q-bits 4 --q-group-size 64]
                              [--dtype float32|float16|bfloat16] [--force] [--expect target|drafter]

SRC is an HF checkpoint (``save_pretrained`` layout) or an MLX conversion,
as a folder or a hub id.  DST receives ``config.json`` (with a
``quantization`` block mirrored as ``quantization_config`` when quantized),
``model-0000i-of-0000N.safetensors`` shards with
``model.safetensors.index.json``, and the tokenizer / chat template /
generation config files.  Multimodal targets are written with mlx-community's
``language_model.model.*`` names (towers dropped), text-only targets as
``model.*`` and drafters under their own names, so mlx-lm loads converted
targets as they are.

The output is built in a temporary folder next to DST and renamed into place
only after it was written and verified; on any failure (including Ctrl-C,
SIGTERM and a full disk) the temporary folder is removed and an existing DST
is left untouched.  A Ctrl-C that arrives during the final renames is held
back, and the renames are undone before it is raised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import loading
from .errors import ConversionError, MtpError

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's limit: 5 GiB per safetensors shard
VERIFY_MAX_BYTES = 2 << 30  # re-load and compare outputs up to this size
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
EXPECT_CHOICES = ("target", "drafter")
MULTIMODAL_TYPES = ("gemma4", "gemma4_unified")
COPY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "*.jinja",
    "generation_config.json",
)


class Progress:
    """A one-line counter per stage on a text stream (stderr by default)."""

    def __init__(self, enabled: bool = True, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream
        self.name = ""
        self.total = 0
        self.count = 0

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _tty(self) -> bool:
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    def stage(self, name: str, total: int = 0) -> None:
        self.name, self.total, self.count = name, total, 0
        if self.enabled and (not total or self._tty()):
            suffix = f" 0/{total}" if total else ""
            self._out().write(f"[convert] {name}{suffix}" + ("\r" if total else "\n"))
            self._out().flush()

    def step(self, n: int = 1) -> None:
        self.count += n
        if self.enabled and self.total:
            done = self.count >= self.total
            if not (done or self._tty()):
                return  # no carriage-return redraws into logs: only the final line
            end = "\n" if done else "\r"
            width = 24
            filled = int(width * min(self.count, self.total) / self.total)
            bar = "#" * filled + "." * (width - filled)
            self._out().write(f"[convert] {self.name} [{bar}] {self.count}/{self.total}{end}")
            self._out().flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self._out().write(f"[convert] {text}\n")
            self._out().flush()


# ---------------------------------------------------------------------------
# helpers (module-level so tests can monkeypatch the writer)


def save_safetensors(file: str, tensors: Dict[str, mx.array], metadata: Dict[str, str]) -> None:
    """Write one shard (the single place that writes weight bytes)."""
    mx.save_safetensors(file, tensors, metadata=metadata)


def _dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]


def _is_multimodal(config: dict) -> bool:
    return config.get("model_type") in MULTIMODAL_TYPES


def _out_name(key: str, kind: str, config: dict) -> str:
    """Our parameter / module name -> the name written to DST."""
    if kind == "target" and _is_multimodal(config):
        return "language_model." + key
    return key


def _check_options(
    q_bits: int, q_group_size: int, dtype: Optional[str], expect: Optional[str]
) -> None:
    if q_bits not in loading.SUPPORTED_BITS:
        raise ConversionError(
            f"unsupported --q-bits {q_bits!r}; pass one of: {', '.join(map(str, loading.SUPPORTED_BITS))}"
        )
    if q_group_size not in loading.SUPPORTED_GROUP_SIZES:
        raise ConversionError(
            f"unsupported --q-group-size {q_group_size!r}; pass one of: "
            f"{', '.join(map(str, loading.SUPPORTED_GROUP_SIZES))}"
        )
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ConversionError(
            f"unsupported --dtype {dtype!r}; pass one of: {', '.join(DTYPE_CHOICES)}"
        )
    if expect is not None and expect not in EXPECT_CHOICES:
        raise ConversionError(
            f"unsupported --expect {expect!r}; use one of: {', '.join(EXPECT_CHOICES)}"
        )


def _check_kind(kind: str, expect: Optional[str], src: str, config: dict) -> None:
    if expect is None or expect == kind:
        return
    model_type = config.get("model_type")
    if kind == "drafter":
        raise ConversionError(
            f"{src} is a Gemma 4 assistant drafter (model_type {model_type}) but a target model was expected; "
            f"pass the target's checkpoint, or convert the drafter with --expect drafter"
        )
    raise ConversionError(
        f"{src} is a Gemma 4 target model (model_type {model_type}) but an assistant drafter was expected; "
        f"pass the '-assistant' checkpoint, or convert the target with --expect target"
    )


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConversionError(
            f"--mlx-path {dst} overlaps the source folder {src}; write the conversion to a separate folder"
        )
    if (dst.exists() or dst.is_symlink()) and not force:
        raise ConversionError(
            f"--mlx-path {dst} already exists; choose another folder or pass --force to replace it"
        )


def _input_dim(module: nn.Module) -> Optional[int]:
    w = getattr(module, "weight", None)
    return None if w is None else int(w.shape[-1])


def quantize_model(
    model: nn.Module, bits: int, group_size: int, progress: Optional[Progress] = None
) -> int:
    """Quantize ``model`` in place with its class's ``quant_predicate``; returns the module count.

    Norms, scalars and integer buffers are never quantized (they are not
    quantizable modules); a module whose input dim is not a multiple of the
    group size stays in floating point.
    """
    predicate = getattr(type(model), "quant_predicate", None)
    candidates = [p for p, m in model.named_modules() if hasattr(m, "to_quantized")]
    if progress:
        progress.stage(f"quantizing to {bits} bits (group {group_size})", len(candidates))
    done = 0

    def class_predicate(path: str, module: nn.Module):
        nonlocal done
        if not hasattr(module, "to_quantized"):
            return False
        if progress:
            progress.step()
        wanted = predicate(path, module) if callable(predicate) else True
        if not wanted:
            return False
        params = {"group_size": group_size, "bits": bits, "mode": "affine"}
        if isinstance(wanted, dict):
            params.update(wanted)
        dim = _input_dim(module)
        if dim is None or dim % params["group_size"] or (dim * params["bits"]) % 32:
            return False
        done += 1
        return params

    nn.quantize(model, group_size, bits, mode="affine", class_predicate=class_predicate)
    return done


def quantized_modules(model: nn.Module) -> Dict[str, Tuple[int, int, str]]:
    """Module path -> (group_size, bits, mode) of every quantized module."""
    out = {}
    for path, m in model.named_modules():
        if "scales" in m and hasattr(m, "bits") and hasattr(m, "group_size"):
            out[path] = (int(m.group_size), int(m.bits), str(getattr(m, "mode", "affine")))
    return out


def quantization_config(
    model: nn.Module, kind: str, config: dict, default: Optional[Tuple[int, int]] = None
) -> Optional[dict]:
    """The mlx-community ``quantization`` block describing ``model`` (None when unquantized)."""
    mods = quantized_modules(model)
    if not mods:
        return None
    if default is None:
        (group, bits, mode), _ = Counter(mods.values()).most_common(1)[0]
    else:
        group, bits = default
        mode = "affine"
    block: Dict[str, Any] = {"group_size": group, "bits": bits, "mode": mode}
    for path in sorted(mods):
        g, b, m = mods[path]
        if (g, b, m) != (group, bits, mode):
            entry: Dict[str, Any] = {"group_size": g, "bits": b}
            if m != mode:
                entry["mode"] = m
            block[_out_name(path, kind, config)] = entry
    return block


def _fill_text_config(text: dict, parsed) -> None:
    """Write every field of our parsed text config explicitly (incl. ``global_head_dim``).

    Other loaders (mlx-lm) have different defaults and do not read
    transformers 5.23's ``per_layer_config``.
    """
    text["global_head_dim"] = parsed.global_head_dim
    for f in fields(parsed):
        if f.name in ("per_layer_config", "model_type") or f.name in text:
            continue
        text[f.name] = copy.deepcopy(getattr(parsed, f.name))


def output_config(
    config: dict, kind: str, quant_block: Optional[dict], dtype: Optional[mx.Dtype]
) -> dict:
    """config.json for DST: the source config plus explicit geometry and the quantization block."""
    from .models.gemma4 import TextConfig

    out = copy.deepcopy(config)
    for key in ("quantization", "quantization_config"):
        out.pop(key, None)
        if isinstance(out.get("text_config"), dict):
            out["text_config"].pop(key, None)
    out.pop("_name_or_path", None)
    if kind == "target":
        text = out["text_config"] if isinstance(out.get("text_config"), dict) else out
        _fill_text_config(text, TextConfig.from_dict(config))
        if _is_multimodal(config):
            # The towers are not written; mlx-lm's wrapper takes the vocab from the top level.
            out["vocab_size"] = text["vocab_size"]
            out.pop("vision_config", None)
            out.pop("audio_config", None)
    elif isinstance(out.get("text_config"), dict):
        # Drafters: only make the full-layer head dim explicit (nobody else loads them with other defaults).
        out["text_config"]["global_head_dim"] = TextConfig.from_dict(
            out["text_config"]
        ).global_head_dim
    if dtype is not None:
        out["dtype"] = _dtype_name(dtype)
        if "torch_dtype" in out:
            out["torch_dtype"] = _dtype_name(dtype)
    if quant_block is not None:
        out["quantization"] = quant_block
        out["quantization_config"] = copy.deepcopy(quant_block)
    return out


def make_shards(weights: Dict[str, mx.array], max_bytes: int) -> List[Dict[str, mx.array]]:
    shards: List[Dict[str, mx.array]] = []
    size = 0
    for key, value in weights.items():
        if not shards or (size + value.nbytes > max_bytes and shards[-1]):
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left" in text or "disk quota" in text


def _write_error(e: BaseException, what: Path) -> ConversionError:
    if _disk_full(e):
        return ConversionError(
            f"disk full while writing {what.name}; nothing was written: free some space or choose another --mlx-path"
        )
    return ConversionError(f"cannot write {what} ({type(e).__name__}: {e}); nothing was written")


def write_weights(
    folder: Path, weights: Dict[str, mx.array], progress: Optional[Progress] = None
) -> Dict[str, Any]:
    """Write safetensors shards and the index into ``folder``; returns the index dict."""
    shards = make_shards(weights, MAX_SHARD_BYTES)
    n = len(shards)
    total = sum(v.nbytes for v in weights.values())
    index: Dict[str, Any] = {"metadata": {"total_size": total}, "weight_map": {}}
    if progress:
        progress.stage(f"writing {n} shard(s), {total / 2**20:.1f} MiB", len(weights))
    for i, shard in enumerate(shards):
        name = SHARD_NAME.format(i + 1, n)
        file = folder / name
        try:
            save_safetensors(str(file), shard, {"format": "mlx"})
        except (OSError, RuntimeError) as e:
            raise _write_error(e, file) from None
        for key in shard:
            index["weight_map"][key] = name
        if progress:
            progress.step(len(shard))
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    _write_json(folder / loading.INDEX_FILE, index)
    return index


def _write_json(file: Path, data: Any) -> None:
    try:
        with open(file, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=file.name == "config.json")
            f.write("\n")
    except OSError as e:
        raise _write_error(e, file) from None


def copy_support_files(src: Path, dst: Path) -> List[str]:
    """Tokenizer, chat template, special tokens and generation config files."""
    copied = []
    names = sorted({p.name for pattern in COPY_PATTERNS for p in src.glob(pattern) if p.is_file()})
    for name in names:
        try:
            shutil.copyfile(src / name, dst / name)  # follows hub-cache symlinks
        except OSError as e:
            raise _write_error(e, dst / name) from None
        copied.append(name)
    return copied


def _verify(model: nn.Module, folder: Path, kind: str, progress: Optional[Progress]) -> None:
    """Re-load the written folder and compare parameters (and target logits) with ``model``."""
    if progress:
        progress.note("verifying: re-loading the output")
    try:
        again = loading.load_model(folder)
    except MtpError as e:
        raise ConversionError(
            f"the written model does not load back ({e}); this is a bug in mlx-mtp"
        ) from None
    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(again.parameters()))
    if set(ours) != set(theirs):
        diff = sorted(set(ours) ^ set(theirs))
        raise ConversionError(
            f"verification failed: parameter sets differ ({diff[:3]}); this is a bug in mlx-mtp"
        )
    for key, value in ours.items():
        if value.dtype != theirs[key].dtype or not mx.array_equal(value, theirs[key]).item():
            raise ConversionError(
                f"verification failed: tensor {key} changed on disk; this is a bug in mlx-mtp"
            )
    if kind == "target":
        vocab = model.args.vocab_size
        ids = mx.array([[2] + [(7 * i + 3) % vocab for i in range(7)]])
        a, b = model(ids), again(ids)
        if not mx.array_equal(a, b).item():
            raise ConversionError(
                "verification failed: the re-loaded model gives different logits; this is a bug in mlx-mtp"
            )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


class _Deferred:
    """Signals (SIGINT/SIGTERM) that arrived while ``_signals_deferred`` was active."""

    def __init__(self) -> None:
        self.signals: List[int] = []

    def __bool__(self) -> bool:
        return bool(self.signals)


@contextlib.contextmanager
def _signals_deferred():
    """Record Ctrl-C / SIGTERM instead of raising, so a few renames are never cut in half.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    pending = _Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    wanted = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {}
    try:
        for sig in wanted:
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.signals.append(signum))
        yield pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _install(tmp: Path, dst: Path) -> Optional[Path]:
    """Move ``tmp`` to ``dst``; an existing ``dst`` is first moved aside (returned, to delete)."""
    if not (dst.exists() or dst.is_symlink()):
        os.replace(tmp, dst)
        return None
    backup = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, backup)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(backup, dst)
        raise
    return backup


@contextlib.contextmanager
def _commit(tmp: Path, dst: Path):
    """Install ``tmp`` as ``dst`` atomically with respect to Ctrl-C; the body runs once it is in.

    An interrupt that arrives while the folders are being renamed is held back;
    if one came, the renames are undone (the old ``dst`` is back, the new output
    is in ``tmp`` again) and ``KeyboardInterrupt`` is raised, exactly as if it
    had arrived a moment earlier.  Once committed (the body ran: the caller
    records success there), a late interrupt is ignored while the old copy is
    deleted.
    """
    with _signals_deferred() as pending:
        try:
            backup = _install(tmp, dst)
        except OSError as e:
            raise _write_error(e, dst) from None
        if pending:
            os.replace(dst, tmp)
            if backup is not None:
                os.replace(backup, dst)
            raise KeyboardInterrupt
        yield
        if backup is not None:
            _remove(backup)


# ---------------------------------------------------------------------------
# conversion


def convert(
    hf_path: str,
    mlx_path: str,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    force: bool = False,
    expect: Optional[str] = None,
    verify: bool = True,
    progress: Any = False,
) -> Path:
    """Convert ``hf_path`` (folder or hub id) into ``mlx_path``; returns the written folder.

    ``expect`` is ``"target"``, ``"drafter"`` or ``None`` (accept both).
    ``progress`` is a ``Progress``, ``True`` (stderr) or ``False``.
    """
    _check_options(q_bits, q_group_size, dtype, expect)
    prog = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    src = loading.get_model_path(hf_path)
    dst = Path(mlx_path).expanduser()
    config = loading.read_config(src)
    kind = loading.model_kind(config)
    _check_kind(kind, expect, str(hf_path), config)
    _check_paths(src, dst, force)
    want = loading.parse_dtype(dtype)
    source_quant = loading.quantization_block(config)
    if quantize and source_quant is not None:
        raise ConversionError(
            f"{hf_path} is already quantized ({source_quant.get('bits')} bits); convert the unquantized "
            f"checkpoint with -q, or drop -q to copy it as is"
        )

    prog.stage(f"loading {kind} from {src}")
    model = loading.load_model(src, dtype=want)
    if quantize:
        quantize_model(model, q_bits, q_group_size, prog)
        block = quantization_config(model, kind, config, default=(q_group_size, q_bits))
    else:
        block = quantization_config(model, kind, config)
    out_config = output_config(config, kind, block, want)
    weights = {_out_name(k, kind, config): v for k, v in tree_flatten(model.parameters())}
    mx.eval(list(weights.values()))
    total = sum(v.nbytes for v in weights.values())

    parent = dst.parent
    created: List[Path] = []
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    tmp = parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ok = False
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(parent).free
        except OSError as e:
            raise ConversionError(f"cannot create the output folder {parent} ({e})") from None
        if free < total + (1 << 20):
            raise ConversionError(
                f"not enough disk space for {dst}: the weights need {total / 2**20:.1f} MiB but only "
                f"{free / 2**20:.1f} MiB are free; free some space or choose another --mlx-path"
            )
        try:
            tmp.mkdir()
        except OSError as e:
            raise _write_error(e, tmp) from None
        write_weights(tmp, weights, prog)
        _write_json(tmp / "config.json", out_config)
        copied = copy_support_files(src, tmp)
        prog.note(f"copied {', '.join(copied) if copied else 'no tokenizer files'}")
        if verify and total <= VERIFY_MAX_BYTES:
            _verify(model, tmp, kind, prog)
        with _commit(tmp, dst):
            ok = True
    finally:
        if not ok:
            with _signals_deferred():  # a second Ctrl-C must not cut the clean-up short
                _remove(tmp)
                for d in created:  # only folders this call created, innermost first, if empty
                    try:
                        d.rmdir()
                    except OSError:
                        break
    prog.note(f"wrote {dst} ({total / 2**20:.1f} MiB{', quantized' if block else ''})")
    return dst


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_mtp.convert",
        description="Convert a Gemma 4 target or MTP assistant drafter to the MLX (mlx-community) layout.",
    )
    parser.add_argument(
        "--hf-path", required=True, help="source folder or hub id (HF original or MLX)"
    )
    parser.add_argument(
        "--mlx-path", required=True, help="output folder (must not exist unless --force)"
    )
    parser.add_argument(
        "-q", "--quantize", action="store_true", help="quantize (affine; router.proj at 8 bits)"
    )
    parser.add_argument(
        "--q-bits", type=int, default=4, help="bits per weight when quantizing (default 4)"
    )
    parser.add_argument(
        "--q-group-size", type=int, default=64, help="quantization group size (default 64)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float dtype to write: float32, float16 or bfloat16 (default: keep)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --mlx-path (after success)"
    )
    parser.add_argument(
        "--expect", default=None, help="refuse the source unless it is a 'target' or a 'drafter'"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip re-loading the output to verify it"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


class _Terminated(KeyboardInterrupt):
    pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: 0 on success, 2 on a user error (one ``error: ...`` line on stderr)."""
    args = setup_arg_parser().parse_args(argv)
    previous = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:

        def on_term(signum, frame):  # SIGTERM cleans up like Ctrl-C
            raise _Terminated()

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            dtype=args.dtype,
            force=args.force,
            expect=args.expect,
            verify=not args.no_verify,
            progress=not args.quiet,
        )
    except MtpError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted; nothing was written (the temporary output was removed and an "
            "existing --mlx-path was left as it was)",
            file=sys.stderr,
        )
        return 130
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
