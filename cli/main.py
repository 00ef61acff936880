"""`resnet <command> ...`: dispatches to `get_args_parser()` + `main(args)` of the module that owns the job.

Modules are imported lazily so that `resnet serve` never imports torch (the gateway image has none).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from cli.errors import ResnetError, raise_terminated

# command -> (module, one-line summary). Each module defines get_args_parser() and main(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.train", "train a ResNet (single process, or DDP under torchrun)"),
    "evaluate": ("training.evaluate", "top-1/top-5 of a checkpoint or an ONNX model (center or 10-crop)"),
    "retrain": ("training.retrain", "fine-tune a checkpoint on new data (optionally a new class set)"),
    "export": ("export.cli", "checkpoint -> verified ONNX / FP16 / INT8 / TensorRT in a Triton repository"),
    "triton": ("export.triton_server", "run a Triton Inference Server on a model repository"),
    "serve": ("server.cli", "run the FastAPI + gRPC gateway"),
    "client": ("server.client", "classify images against the gateway or Triton (HTTP or gRPC)"),
    "loadtest": ("loadtest.cli", "run a headless Locust scenario with pass/fail thresholds"),
    "bench": ("loadtest.bench", "run the benchmark suite and regenerate docs/benchmarks.md"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="resnet",
        description="resnet-serving: train, export, serve and load-test ResNet image classifiers.",
        epilog=epilog + "\n\nRun `resnet <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", choices=sorted(COMMANDS), metavar="command", help="one of the commands below"
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A usage error prints one line naming the flag and where the help is, not argparse's whole usage block."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see `{parser.prog} --help`)\n")

    parser.error = error
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subcommands (`triton serve`) only here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, subparser in action.choices.items():
                subparser.prog = (
                    f"{parser.prog} {name}"  # made before `run` named the parent `resnet <command>`
                )
                _one_line_errors(subparser)
    return parser


def run(argv: list[str]) -> int:
    top_parser = _one_line_errors(_top_level_parser())
    if not argv:  # `resnet` alone: the commands, rather than "the following arguments are required"
        top_parser.print_help(sys.stderr)
        return 2
    top = top_parser.parse_args(argv)
    module_name, summary = COMMANDS[top.command]
    module = importlib.import_module(module_name)
    parser = module.get_args_parser()
    parser.prog = f"resnet {top.command}"
    if not parser.description:
        parser.description = summary
    args = _one_line_errors(parser).parse_args(top.args)
    status = module.main(args)
    return int(status or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # gRPC's C core logs a failed TLS handshake to stderr at INFO otherwise; the one-line error says it already
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    return _with_one_line_errors(lambda: run(argv))


def run_script(
    get_args_parser: Callable[[], argparse.ArgumentParser], script_main, prefix: str = "resnet"
) -> NoReturn:
    """`python -m <module>` for a module outside `resnet <command>` (the benchmarks, the reproduction): its
    `main(args)`, with its errors told as `resnet` tells them, and SIGTERM unwinding through its clean-ups (the
    servers a benchmark started, its scratch folders) unless the module handles it itself."""
    signal.signal(signal.SIGTERM, raise_terminated)

    def job() -> int:
        status = script_main(get_args_parser().parse_args())
        return status if isinstance(status, int) else 0  # some return their results for callers in Python

    sys.exit(_with_one_line_errors(job, prefix))


def _with_one_line_errors(job: Callable[[], int], prefix: str = "resnet") -> int:
    """`job`'s exit status; a failure the user can fix is one line and an exit code, not a traceback."""
    try:
        return job()
    except ResnetError as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the file system said no (a missing folder, no space, no permission): fixable
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
