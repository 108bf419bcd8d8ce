"""The bundled demo pair: a tiny Gemma 4 code model and its MTP assistant.

Both were trained from scratch on the Python standard library (see
``shared/models/README.md`` in the project) and converted to MLX: the target
quantized to 4 bits and the assistant unquantized, both stored in float32 (fast on
a CPU too).  They are small enough to ship
inside the package so ``python -m mlx_mtp.generate`` works with no download.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo_models"
DEMO_MODEL = "tiny-gemma4-code-4bit"
DEMO_DRAFT = "tiny-gemma4-code-assistant"
DEMO_PROMPT = "def fibonacci(n):"

# What to pass for a real model (printed by the CLI when it runs the demo).
REAL_MODEL_HINT = (
    "--model mlx-community/gemma-4-e2b-it-4bit "
    "--draft-model mlx-community/gemma-4-E2B-it-assistant-bf16"
)


def demo_model_path() -> Path:
    """Folder of the bundled demo target (MLX format, 4-bit, float32 scales)."""
    return DEMO_DIR / DEMO_MODEL


def demo_draft_path() -> Path:
    """Folder of the bundled demo drafter (MLX format, float32)."""
    return DEMO_DIR / DEMO_DRAFT


def demo_banner(drafter: str = "bundled") -> str:
    """The one line the CLI prints when ``--model`` is omitted.

    ``drafter``: ``"bundled"``, ``"custom"`` (from ``--draft-model``) or ``"none"``.
    """
    what = {
        "bundled": "with its bundled MTP drafter",
        "custom": "with the drafter given by --draft-model",
        "none": "without drafting",
    }[drafter]
    return (
        f"Running the bundled demo, a tiny Gemma 4 code model (9M parameters, trained on Python's "
        f"standard library) {what}; for a real model pass {REAL_MODEL_HINT}"
    )
