"""``ratelab`` command line: one subcommand per module in this package.

Each module exposes ``add_parser(subparsers)`` and ``run(args) -> int``. Mistakes a user can make (bad paths,
unknown names, malformed options, diverged training) end in one clear line on stderr and a non-zero exit code, not
a traceback; ``RATELAB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ratelab.cli.errors import UsageError

# Order is the order shown in --help.
_COMMANDS = ("train", "eval", "measure", "models", "reproduce", "demo")


def build_parser() -> argparse.ArgumentParser:
    from ratelab import __version__

    parser = argparse.ArgumentParser(
        prog="ratelab",
        description="Build, train, measure and reproduce white-box / rate-reduction representation learning.",
        epilog="Run `ratelab COMMAND --help` for the options of a command. Multi-process: "
        "`torchrun --nproc_per_node=N -m ratelab train ...`.",
    )
    parser.add_argument("--version", action="version", version=f"ratelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"ratelab.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ratelab: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        if os.environ.get("RATELAB_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ratelab {args.command}: error: {msg}", file=sys.stderr)
        return 2 if not isinstance(e, RuntimeError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
