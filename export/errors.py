"""Errors a user can fix while exporting or serving; the CLI prints them as one line."""

from cli.errors import ResnetError


class ExportError(ResnetError):
    """The export cannot proceed: bad flags, unreadable checkpoint, missing calibration data."""


class WeightsUnavailableError(ExportError):
    """Pretrained weights could not be downloaded or failed their hash check."""


class VerificationError(ExportError):
    """An exported artifact does not match the PyTorch model; nothing was published."""


class AccuracyBudgetError(ExportError):
    """A quantized model lost more accuracy than allowed; nothing was published."""


class RepositoryError(ResnetError):
    """The model repository cannot be written or read as asked."""


class TritonError(ResnetError):
    """tritonserver could not be found, started or made ready."""
