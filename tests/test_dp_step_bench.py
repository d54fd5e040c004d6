"""benchmarks/dp_step.py in smoke mode: the three clipping modes agree before timing, every contender is timed and
the record is written (in-process: the script's imports are the test's)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_dp_step_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports _machine from its own folder
    spec = importlib.util.spec_from_file_location("dp_step_bench", BENCH / "dp_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rec.json"
    threads = __import__("torch").get_num_threads()
    try:
        assert mod.main(["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    finally:
        __import__("torch").set_num_threads(threads)
    text = capsys.readouterr().out
    assert "clipped sums agree" in text and "target ghost <= 1.5x non-DP" in text
    rec = json.loads(out.read_text())
    assert [r["contender"] for r in rec["rows"]] == ["non-DP", "ghost", "hooks", "functorch"]
    assert all(v < 1e-4 for v in rec["equivalence"]["test_dpcap"].values())
    assert rec["rows"][1]["x_nondp"]["1"]["median"] > 0
    assert "dp_step_bench" not in sys.modules
