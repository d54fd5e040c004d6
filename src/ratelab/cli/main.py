"""``ratelab`` command line: one subcommand per module in this package.

Each module exposes ``add_parser(subparsers)`` and ``run(args) -> int`` (``run(args, extra)`` for commands that set
``accepts_extra``: they take dotted options such as ``--task.eps 0.5``). Mistakes a user can make (bad paths,
unknown names, malformed options, diverged training) raise the library's own errors
(:class:`ratelab.core.errors.RatelabError`) and end in one clear line on stderr and a non-zero exit code;
``RATELAB_DEBUG=1`` shows their traceback. Any other exception is a bug and shows its full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order is the order shown in --help.
_COMMANDS = ("train", "eval", "measure", "segment", "models", "weights", "reproduce", "demo")
# Commands whose torch work gets an automatic thread count (recipes pin theirs: ``--threads``, default 1).
_AUTO_THREADS = ("train", "eval", "measure")


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
    for name in _AUTO_THREADS:
        sub.choices[name].add_argument(
            "--threads", type=int, default=0, metavar="N",
            help="CPU threads for torch (default 0 = automatic: torch's default, less the CPUs other processes "
                 "keep busy, unless OMP_NUM_THREADS is set; see docs/training.md 'Threads')")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ratelab.core.errors import RatelabError, TrainingDiverged

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command in _AUTO_THREADS:
            _set_threads(args.threads)
        return int((args.func(args, extra) if getattr(args, "accepts_extra", False) else args.func(args)) or 0)
    except KeyboardInterrupt:
        print("ratelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ratelab models | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except RatelabError as e:
        if os.environ.get("RATELAB_DEBUG"):
            raise
        print(f"ratelab {args.command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2


def _set_threads(requested: int) -> None:
    from ratelab.core.errors import UsageError
    from ratelab.core.threads import apply_threads

    if requested < 0:
        raise UsageError(f"--threads: must be >= 0 (0 = automatic), got {requested}")
    # torchrun exports OMP_NUM_THREADS=1 for several processes per node, so ranks never each claim the idle CPUs.
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    apply_threads(requested or None, log=(lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None))


if __name__ == "__main__":
    raise SystemExit(main())
