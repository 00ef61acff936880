"""`--help` for every command: argparse's "(default: X)" only where X says something."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one and the help text does not already explain it (argparse's own
    printed "(default: None)" after "default: the only model served")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", []):
            return text
        return super()._get_help_string(action)
