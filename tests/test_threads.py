import os

import pytest
import torch

from ratelab.core import threads as th


@pytest.fixture
def restore_threads():
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def test_busy_cpus_is_a_cpu_count():
    busy = th.busy_cpus(0.05)
    if busy is None:
        pytest.skip("no /proc/stat on this system")
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_explicit_request_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    c = th.choose_threads(2)
    assert c.threads == 2 and c.reason == "--threads"


def test_omp_num_threads_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(th, "busy_cpus", lambda interval=0.3: pytest.fail("must not sample when OMP_NUM_THREADS"))
    c = th.choose_threads(None)
    assert c.threads == torch.get_num_threads() and not c.changed and c.reason == "OMP_NUM_THREADS"


@pytest.mark.parametrize(("usable", "busy", "default", "expect"), [
    (2, 0.1, 2, 2),   # quiet: torch's default
    (2, 0.6, 2, 1),   # another process on most of a core: give its core up
    (2, 1.0, 2, 1),
    (2, 2.0, 2, 1),   # never below one
    (16, 3.2, 8, 8),  # plenty idle: never above torch's default
    (16, 12.0, 8, 4),
])
def test_oversubscription_lowers_the_count(monkeypatch, restore_threads, usable, busy, default, expect):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "usable_cpus", lambda: usable)
    monkeypatch.setattr(th, "busy_cpus", lambda interval=0.3: busy)
    torch.set_num_threads(default)
    c = th.choose_threads(None)
    assert c.threads == expect and c.changed == (expect != default)
    if c.changed:
        assert "busy with other processes" in c.reason


def test_apply_threads_sets_and_logs(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "usable_cpus", lambda: 2)
    monkeypatch.setattr(th, "busy_cpus", lambda interval=0.3: 1.0)
    torch.set_num_threads(2)
    lines = []
    th.apply_threads(None, log=lines.append)
    assert torch.get_num_threads() == 1
    assert len(lines) == 1 and "--threads" in lines[0] and "OMP_NUM_THREADS" in lines[0]


def test_cli_threads_argument(capsys, restore_threads):
    from ratelab.cli.main import main

    assert main(["measure", "--threads", "-1", "--model", "crate_pico_patch4_16", "--out", "unused"]) == 2
    assert "--threads" in capsys.readouterr().err
