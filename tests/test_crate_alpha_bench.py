"""benchmarks/crate_alpha_speed.py in smoke mode: it checks fast == reference before timing and writes its record."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "crate_alpha_speed.py"


@pytest.mark.slow
def test_crate_alpha_speed_smoke(tmp_path):
    out = tmp_path / "rec.json"
    res = subprocess.run([sys.executable, str(BENCH), "--quick", "--skip-train", "--threads", "1", "--repeats", "1",
                          "--warmup", "0", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "ODL fast vs ref" in res.stdout and "| ODL fwd+bwd | ref |" in res.stdout
    rec = json.loads(out.read_text())
    assert rec["machine"]["cores"] >= 1
