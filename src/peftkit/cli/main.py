"""``peftkit``: the command-line entry point; each subcommand lives in its own module.

Subcommand modules expose ``HELP`` (one line) and ``run(argv) -> exit code``. User errors end as one
line ``error: ...`` on stderr with exit code 2; ``PEFTKIT_DEBUG=1`` shows their traceback too.
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import EXIT_USER_ERROR, USER_ERROR_TYPES, UserError, did_you_mean, one_line

COMMANDS = {
    "train": "train",
    "eval": "eval",
    "merge": "merge",
    "generate": "generate",
    "inspect": "inspect",
    "methods": "methods",
    "params": "params",
    "memory": "memory",
    "recommend": "recommend",
    "sweep": "sweep",
    "compare": "compare",
}


def usage() -> str:
    lines = ["usage: peftkit COMMAND [options]   (peftkit COMMAND --help for its options)", "", "commands:"]
    for name, module in COMMANDS.items():
        lines.append(f"  {name:<9} {_module(module).HELP}")
    return "\n".join(lines)


def _module(name: str):
    return importlib.import_module(f"peftkit.cli.{name}")


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from peftkit import __version__

        print(f"peftkit {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}{did_you_mean(command, COMMANDS)}; commands: {', '.join(COMMANDS)}")
    return _module(COMMANDS[command]).run(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return dispatch(argv)
    except (UserError, *USER_ERROR_TYPES) as err:
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `peftkit inspect X | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
