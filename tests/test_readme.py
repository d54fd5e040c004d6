"""The README matches the code: its measured block is what the records give, every recipe is in the record, every
command line of its usage block parses, every file it names exists."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_measured_block_is_generated_from_the_records():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_figures.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_record_covers_every_recipe_at_quick_scale():
    from ratelab.recipes import list_recipes

    rec = json.loads((ROOT / "docs" / "records" / "demo_quick.json").read_text())
    assert list(rec["summary"]["recipes"]) == [s.name for s in list_recipes()]
    assert rec["summary"]["scale"] == "quick" and rec["summary"]["seed"] == 0
    assert all(r["threads"] == 1 for r in rec["summary"]["recipes"].values())


def test_check_fails_on_a_hand_edited_figure(tmp_path, monkeypatch):
    """The check can fail: change one measured figure in the README and it says so."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_figures as rf

    text = README
    block = rf.current_block(text)
    edited = tmp_path / "README.md"
    m = re.search(r"\| (holds|\*\*does not hold\*\*) \| ([^|]+) \|", block)
    assert m is not None
    edited.write_text(text.replace(m.group(0), m.group(0).replace(m.group(2), m.group(2) + "0"), 1))
    monkeypatch.setattr(rf, "README", edited)
    assert rf.main(["--check"]) == 1


def _usage_lines() -> list[str]:
    block = README[README.index("## Usage"):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")]
    lines, buf = [], ""
    for raw in block.splitlines():
        line = raw.split("  #")[0].split(" # ")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        buf += line
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        lines.append(buf.strip())
        buf = ""
    return lines


USAGE = [x for x in _usage_lines() if x.startswith(("ratelab ", "python -m ratelab", "torchrun "))]


@pytest.mark.parametrize("line", USAGE)
def test_usage_line_parses(line):
    from ratelab.cli.main import build_parser

    argv = shlex.split(line)
    if argv[0] == "torchrun":
        argv = argv[argv.index("ratelab") + 1:]
    elif argv[0] == "python":
        argv = argv[3:]
    else:
        argv = argv[1:]
    if argv == ["--help"]:
        return
    args, extra = build_parser().parse_known_args(argv)
    assert not extra or getattr(args, "accepts_extra", False), f"unknown arguments {extra} in: {line}"
    if args.command == "reproduce" and args.recipe:
        from ratelab.recipes import get_recipe

        get_recipe(args.recipe)


def test_usage_block_was_found():
    assert len(USAGE) >= 15


def test_files_the_readme_names_exist():
    for rel in re.findall(r"`((?:docs|benchmarks|scripts|tests)/[\w./-]+\.(?:md|py|sh|json))`", README):
        assert (ROOT / rel).exists(), rel


def test_listed_times_match_the_record():
    """`ratelab reproduce --list` quotes each quick run's length; it must agree with the recorded run (within the
    spread of a shared machine)."""
    from ratelab.recipes import list_recipes

    rec = json.loads((ROOT / "docs" / "records" / "demo_quick.json").read_text())["summary"]["recipes"]
    for spec in list_recipes():
        ratio = rec[spec.name]["wall_time_s"] / spec.quick_seconds
        assert 0.4 <= ratio <= 2.5, (spec.name, rec[spec.name]["wall_time_s"], spec.quick_seconds)
