"""benchmarks/var_sampling.py: the attention accounting of the M-VAR paper by code, and a smoke run that checks
state carry == re-scan before timing and writes its record."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "var_sampling.py"


def _bench():
    spec = importlib.util.spec_from_file_location("var_sampling", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_accounting():
    acc = _bench().attention_accounting
    a = acc((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert (a["L"], a["intra_scale_pairs"], a["block_causal_pairs"]) == (680, 110_468, 286_434)
    assert round(100 * a["intra_share_of_dense"], 1) == 23.9
    assert round(100 * a["intra_share_of_block_causal"], 1) == 38.6
    assert a["rescan_mamba_token_steps"] == 1710
    b = acc((1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    assert b["L"] == 2240 and round(100 * b["intra_share_of_dense"], 1) == 30.3
    # at equal depth M-VAR does ~1.47x VAR's (KV-cached) per-token work at the d16 width: why it is not faster
    macs = _bench().block_macs_per_token(1024, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert 1.4 < macs["mvar_over_var"] < 1.5


@pytest.mark.slow
def test_var_sampling_smoke(tmp_path):
    out = tmp_path / "rec.json"
    res = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "same tokens True" in res.stdout and "| 64 | 1 |" in res.stdout
    rec = json.loads(out.read_text())
    assert rec["results"]["64/equivalence"]["same_tokens"] is True
    assert set(rec["results"]["64/1"]["generate_s_per_image"]) == {"mvar_carry", "mvar_rescan", "var_kv"}
