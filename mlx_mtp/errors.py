"""Exceptions raised for a user's mistakes.

Every error a user can cause (bad path, bad checkpoint, bad option, mismatched
drafter) is an ``MtpError``; it subclasses ``ValueError`` so callers can catch
it as such, and its message says what is wrong and what to do.  The CLI turns
it into one line on stderr and exit code 2.
"""


class MtpError(ValueError):
    """Base class of every user-facing error of mlx-mtp."""


class ModelNotFoundError(MtpError):
    """A model path or hub repository could not be found or fetched."""


class ModelConfigError(MtpError):
    """config.json is missing, unreadable, or describes an unsupported model."""


class CheckpointError(MtpError):
    """Weights are missing, truncated, unsafe or do not match the config."""


class DrafterMismatchError(MtpError):
    """The draft model cannot be paired with the target model (or the two are swapped)."""


class GenerationError(MtpError):
    """A generation request is invalid (prompt, sampling options, lengths)."""


class ConversionError(MtpError):
    """A conversion request is invalid or the conversion failed."""
