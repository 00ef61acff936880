"""User-fixable training failures; `cli/main.py` prints each as one line and exits non-zero."""

from cli.errors import ResnetError


class UnknownArchError(ResnetError):
    """An architecture name that `build_model` does not know."""


class UnknownRecipeError(ResnetError):
    """A recipe name that `training.recipes` does not know."""


class DataError(ResnetError):
    """A data folder that is missing, empty, or laid out in a way we cannot read."""


class MissingSplitError(DataError):
    """No folder (or batches) for a split at all: training then runs without validation, unlike a broken one."""


class CheckpointError(ResnetError):
    """A checkpoint that is missing, unreadable, or does not fit the request."""


class RunFolderError(ResnetError):
    """A file of the run's folder that cannot be written (a full disk): the checkpoints before it stay intact."""


class ClassMismatchError(ResnetError):
    """Retraining data whose classes differ from the checkpoint's (and no --new-classes)."""


class ConfigError(ResnetError):
    """Flags that contradict each other or the environment (e.g. batch size not divisible by world size)."""


class TrainingDiverged(ResnetError):
    """The loss or the weights became NaN or infinite (a learning rate too high for the run): the run stops before
    such weights become a checkpoint that `--resume auto`, `best.pt` or `resnet export` would pick up."""
