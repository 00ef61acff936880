"""The one error type the CLI boundary translates into a one-line message and an exit code.

Every package raises subclasses of `ResnetError` for problems a user can fix (bad flags, missing data,
a model that fails verification). An `OSError` that reaches the boundary (the file system refusing: a folder
that cannot be made, a full disk, no permission) is the user's to fix too and also gets one line. Anything else
is a bug and keeps its traceback.
Kept free of heavy imports: the gateway image imports it without torch.
"""


class ResnetError(Exception):
    """A user-facing failure: the message is printed as one line, the process exits with `exit_code`."""

    exit_code = 1


class Terminated(ResnetError):
    """SIGTERM (docker stop, a job's time limit, kill) as an exception, so that the work unwinds through its
    clean-ups (scratch folders removed, a half-published export undone) instead of stopping where it stood."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: `signal.signal(signal.SIGTERM, raise_terminated)`."""
    raise Terminated("stopped by SIGTERM")
