"""``ratelab weights``: the official releases ratelab knows, whether their files are on disk, and where to get them.

``ratelab weights list [PATTERN]`` prints one line per release (``architecture.tag``, file status, expected path) and,
for a file that is not there, the URL to download it from; ``ratelab weights info NAME`` prints one entry in full.
Nothing is downloaded: files go into ``$RATELAB_WEIGHTS`` (default ``~/.cache/ratelab/weights``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights", help="list official pretrained weights and whether they are on disk",
        description="Official weight releases known to ratelab (create_model(name, pretrained=True)). ratelab never "
        "downloads: put the files under $RATELAB_WEIGHTS (default ~/.cache/ratelab/weights) at the path shown.",
    )  # fmt: skip
    actions = p.add_subparsers(dest="weights_command", metavar="ACTION", help="list or info")
    ls = actions.add_parser("list", help="one line per release: status, expected path, download URL",
                            description="List releases whose name or architecture matches PATTERN.")
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'crate_*' (default: all)")
    ls.set_defaults(func=run_list)
    info = actions.add_parser("info", help="every field of one release", description="Print one release in full.")
    info.add_argument("name", help="release name 'architecture.tag', or an architecture (its default release)")
    info.set_defaults(func=run_info)
    p.set_defaults(func=_usage(p))


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return run


def _model_state(architecture: str) -> str:
    from ratelab.models._factory import is_model

    return "" if is_model(architecture) else "model not implemented yet"


def run_list(args: argparse.Namespace) -> int:
    from ratelab.core.errors import UnknownNameError, did_you_mean
    from ratelab.models import _pretrained as pt

    names = pt.list_pretrained(args.pattern)
    if not names:
        raise UnknownNameError(
            f"no weights entry matches {args.pattern!r}{did_you_mean(args.pattern, pt.list_pretrained())}"
        )
    print(f"weights directory: {pt.weights_dir()} (${pt.ENV_VAR})")
    counts: dict[str, int] = {}
    pending = 0
    for name in names:
        cfg = pt.get_pretrained_cfg(name)
        status = pt.weights_status(cfg)
        counts[status] = counts.get(status, 0) + 1
        model = _model_state(cfg.architecture)
        pending += bool(model)
        path = pt.weights_path(cfg)
        line = f"{name:46s} {status:18s} {path if path is not None else '-'}"
        print(line + (f"  [{model}]" if model else ""))
        if not cfg.released:
            print(f"    {cfg.notes}")
        elif status == "missing":
            print(f"    get it from {cfg.url}")
        elif status == "sha256 MISMATCH":
            print(f"    the file differs from the release: download it again from {cfg.url}")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{len(names)} entries: {summary}" + (f"; {pending} with the model not implemented yet" if pending else ""))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ratelab.models import _pretrained as pt

    cfg = pt.get_pretrained_cfg(args.name)
    d = cfg.to_dict()
    flagged = set(cfg.unverified)
    print(cfg.name)
    for key, value in d.items():
        if key in ("name", "unverified") or value in (None, "", {}, ()):
            continue
        mark = "  (unverified)" if key in flagged or any(f.startswith(key + ".") for f in flagged) else ""
        print(f"  {key + ':':15s} {value}{mark}")
    if flagged:
        print(f"  {'unverified:':15s} {', '.join(cfg.unverified)} (see notes)")
    model = _model_state(cfg.architecture)
    print(f"  {'model:':15s} {model or 'implemented'}")
    status = pt.weights_status(cfg)
    print(f"  {'status:':15s} {status}")
    path = pt.weights_path(cfg)
    if path is not None:
        print(f"  {'path:':15s} {path}")
        if status.startswith("present") or "MISMATCH" in status:
            print(f"  {'file sha256:':15s} {pt.file_sha256(path)}")
    if status in ("missing", "not released", "sha256 MISMATCH"):
        print(f"  {'get it:':15s} {pt.download_hint(cfg)}")
    return 0
