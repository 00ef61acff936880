"""Every command's `--help`: a default is shown where it says something, and not as "(default: None)"."""

from __future__ import annotations

import argparse
import importlib

import pytest

from cli.main import COMMANDS

MODULES = sorted(
    {module for module, _ in COMMANDS.values()}
    | {"training.benchmark", "training.reproduce", "export.benchmark", "server.grpc_bench"}
)


def help_pages(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's help and that of each of its subcommands."""
    pages = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                pages += help_pages(subparser)
    return pages


@pytest.mark.parametrize("module", MODULES)
def test_help_shows_no_empty_defaults(module, monkeypatch):
    for name in ("RESNET_CA_CERT", "RESNET_CLIENT_MODEL", "RESNET_API_KEY", "RESNET_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)
    text = " ".join(" ".join(help_pages(importlib.import_module(module).get_args_parser())).split())
    for empty in ("(default: None)", "(default: False)", "(default: )", "default: None)", "default: )"):
        assert empty not in text, (
            f"{module} --help: {text[max(0, text.find(empty) - 160) : text.find(empty) + 20]}"
        )


def test_serve_help_shows_a_zero_default_as_zero():
    from server.cli import get_args_parser

    text = " ".join(get_args_parser().format_help().split())
    assert "RESNET_INTRA_OP_THREADS; default: 0)" in text and "RESNET_SSL_CERTFILE; default: none)" in text
