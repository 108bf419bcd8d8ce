"""mlx-mtp: Gemma 4 on MLX, sped up losslessly by Multi-Token Prediction drafters.

Quick start::

    from mlx_mtp import load, generate

    model, tokenizer = load("mlx-community/gemma-4-e2b-it-4bit")
    drafter, _ = load("mlx-community/gemma-4-E2B-it-assistant-bf16")
    print(generate(model, tokenizer, "Write a haiku about MLX.", draft_model=drafter))

``import mlx_mtp`` stays fast: model code, mlx-lm and transformers load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

import sys
import types

from .errors import (
    CheckpointError,
    ConversionError,
    DrafterMismatchError,
    GenerationError,
    ModelConfigError,
    ModelNotFoundError,
    MtpError,
)
from .sampling import Sampler, make_sampler

# Loaded on first use: these pull in mlx-lm/transformers/the models.
_LAZY = {
    "load": "loading",
    "stream_generate": "generate",
    "GenerationResponse": "generate",
}

__all__ = [
    "CheckpointError",
    "ConversionError",
    "DrafterMismatchError",
    "GenerationError",
    "GenerationResponse",
    "ModelConfigError",
    "ModelNotFoundError",
    "MtpError",
    "Sampler",
    "__version__",
    "generate",
    "load",
    "make_sampler",
    "stream_generate",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_mtp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY) | {"generate"})


class _Package(types.ModuleType):
    """``mlx_mtp.generate`` is the function, as in mlx-lm, even though a submodule
    of the same name exists (importing a submodule binds its name on the
    package; that binding is ignored here).  The function is imported lazily, so
    ``python -m mlx_mtp.generate`` runs without a double-import warning."""

    @property
    def generate(self):
        override = self.__dict__.get("_generate_override")
        if override is not None:
            return override
        from .generate import generate as fn

        return fn

    @generate.setter
    def generate(self, value):
        if not isinstance(value, types.ModuleType):  # e.g. unittest.mock.patch
            self.__dict__["_generate_override"] = value

    @generate.deleter
    def generate(self):
        self.__dict__.pop("_generate_override", None)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .generate import GenerationResponse, generate, stream_generate
    from .loading import load
