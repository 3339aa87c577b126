"""An ArgumentParser whose usage errors are one-line user errors (with the nearest flag suggested)."""

from __future__ import annotations

import argparse
import re

from .errors import UserError, did_you_mean


class Parser(argparse.ArgumentParser):
    """No prefix abbreviations: a misspelt flag must fail, not silently pick a longer one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse would print the usage block and exit itself
        raise UserError(f"{message}{self._suggestion(message)}; see '{self.prog} --help'")

    def _suggestion(self, message: str) -> str:
        found = re.search(r"unrecognized arguments: (--[\w-]+)", message)
        if not found:
            return ""
        known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        return did_you_mean(found.group(1), known)
