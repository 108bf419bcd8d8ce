"""Shared pytest fixtures.

HF reference fixtures (tiny random-weight Gemma 4 targets + MTP assistants written with transformers'
``save_pretrained``) are built lazily, once per session, into ``tmp_path_factory`` directories. They need torch and
transformers; fixtures skip when those are missing. See ``tests/hf_ref.py`` for the geometry of every variant.

Fixture API
-----------
* ``hf_target(variant) -> Path`` / ``hf_assistant(variant) -> Path``: session-scoped factories,
  ``variant`` in ``("e2b", "e4b", "26b", "31b", "12b", "text")``; the assistant is paired with the target of the
  same variant (building it builds the target too).
* Named shortcuts: ``hf_e2b``, ``hf_e4b``, ``hf_26b``, ``hf_31b``, ``hf_12b``, ``hf_text`` and ``hf_e2b_assistant``,
  ``hf_e4b_assistant``, ``hf_26b_assistant``, ``hf_31b_assistant``, ``hf_12b_assistant``, ``hf_text_assistant``.
* ``hf_pair(variant) -> (target_path, assistant_path)``.
* ``shared_models -> Path``: the trained tiny fixtures (``tiny-gemma4-code``, ``tiny-gemma4-code-assistant``) in
  ``<repo>/../shared/models``; skips if absent.
* ``hf``: the ``hf_ref`` module itself (skips without torch / transformers).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SHARED_MODELS = (REPO_ROOT / ".." / "shared" / "models").resolve()

if str(TESTS_DIR) not in sys.path:  # make `import hf_ref` work regardless of pytest's import mode
    sys.path.insert(0, str(TESTS_DIR))

# A non-interactive shell starts background jobs with SIGINT ignored, and the CLIs the Ctrl-C tests
# start would inherit that and never see the signal (they ran to the end and exited 0).  Restore
# Python's handler so children start with the default disposition, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _import_hf_ref():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_ref

    return hf_ref


@pytest.fixture(scope="session")
def hf():
    """The ``tests/hf_ref.py`` module (skips if torch / transformers are unavailable)."""
    return _import_hf_ref()


@pytest.fixture(scope="session")
def _hf_build_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_fixtures")


@pytest.fixture(scope="session")
def hf_target(_hf_build_root):
    """Factory: ``hf_target(variant) -> Path`` of a saved tiny target (built once per session)."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        hf_ref = _import_hf_ref()
        if variant not in hf_ref.VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {hf_ref.VARIANTS}")
        if variant not in built:
            built[variant] = hf_ref.build_target(
                variant, _hf_build_root / f"target-{variant}", seed=0
            )
        return built[variant]

    return get


@pytest.fixture(scope="session")
def hf_assistant(_hf_build_root, hf_target):
    """Factory: ``hf_assistant(variant) -> Path`` of a saved tiny assistant paired with ``hf_target(variant)``."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        hf_ref = _import_hf_ref()
        if variant not in built:
            built[variant] = hf_ref.build_assistant(
                variant, hf_target(variant), _hf_build_root / f"assistant-{variant}", seed=0
            )
        return built[variant]

    return get


@pytest.fixture(scope="session")
def hf_pair(hf_target, hf_assistant):
    """Factory: ``hf_pair(variant) -> (target_path, assistant_path)``."""

    def get(variant: str) -> tuple[Path, Path]:
        return hf_target(variant), hf_assistant(variant)

    return get


def _target_fixture(variant: str):
    @pytest.fixture(scope="session")
    def _fixture(hf_target) -> Path:
        return hf_target(variant)

    _fixture.__doc__ = f"Path of the tiny HF {variant!r} target checkpoint."
    return _fixture


def _assistant_fixture(variant: str):
    @pytest.fixture(scope="session")
    def _fixture(hf_assistant) -> Path:
        return hf_assistant(variant)

    _fixture.__doc__ = f"Path of the tiny HF assistant paired with the {variant!r} target."
    return _fixture


hf_e2b = _target_fixture("e2b")
hf_e4b = _target_fixture("e4b")
hf_26b = _target_fixture("26b")
hf_31b = _target_fixture("31b")
hf_12b = _target_fixture("12b")
hf_text = _target_fixture("text")
hf_e2b_assistant = _assistant_fixture("e2b")
hf_e4b_assistant = _assistant_fixture("e4b")
hf_26b_assistant = _assistant_fixture("26b")
hf_31b_assistant = _assistant_fixture("31b")
hf_12b_assistant = _assistant_fixture("12b")
hf_text_assistant = _assistant_fixture("text")


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """``<repo>/../shared/models`` (trained tiny target + assistant); skips if it is missing."""
    if not (SHARED_MODELS / "tiny-gemma4-code").is_dir():
        pytest.skip(
            f"shared tiny models not found at {SHARED_MODELS} (expected tests/../../shared/models)"
        )
    return SHARED_MODELS
