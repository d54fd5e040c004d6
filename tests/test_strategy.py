"""Strategies: FSDP2 == DDP == one process, exact FSDP resume, full state dicts, activation checkpointing, and the
single-process checkpoint path.

The 2-process runs are one torchrun launch of tests/_strategy_worker.py (gloo on CPU); the one-process reference
runs the worker's own functions here. Tolerances: different strategies differ only in the order gloo sums
gradients (float32 rounding, measured <= 2e-7 after 3 AdamW steps), so 1e-5; a resume on the same world size is
bitwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _dist import run_torchrun
from _strategy_worker import build, make_batches, train

import ratelab
from ratelab.core.dist import DistInfo
from ratelab.core.errors import CheckpointError, ConfigError
from ratelab.train.strategy import (
    DDPStrategy,
    FSDPStrategy,
    SingleStrategy,
    _block_units,
    _commit_dir,
    _find_dir_checkpoint,
    build_strategy,
)

WORKER = Path(__file__).with_name("_strategy_worker.py")
ONE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TWO = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
# CRATE's folded ISTA returns a reshaped view; FSDP2 warns that an in-place op on a block's output would be unsafe
# (none follows in CRATE). Only the one-process FSDP test here sees it; the torchrun workers' stderr is not checked.
VIEW_WARNING = "ignore:FSDP2-wrapped module.*view tensor:UserWarning"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategy")
    run_torchrun(WORKER, "--out", root / "res.pt", "--ckpt-dir", root / "run", timeout=240)
    return root, torch.load(root / "res.pt", weights_only=False)


@pytest.fixture(scope="module")
def single():
    out = {}
    for accum in (1, 2):
        strategy, model, wrapped, opt = build("single", ONE)
        norms = train(strategy, model, wrapped, opt, make_batches(), accum=accum)
        out[accum] = {"sd": strategy.full_state_dict(model), "norms": norms}
    return out


# ---- 2 processes ---------------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(
    "variant, cls, accum",
    [("ddp", "DDPStrategy", 1), ("ddp_accum2", "DDPStrategy", 2), ("fsdp", "FSDPStrategy", 1),
     ("fsdp_accum2", "FSDPStrategy", 2)],
)
def test_two_processes_equal_one(workers, single, variant, cls, accum):
    _, res = workers
    got = res[variant]
    assert res["world_size"] == 2 and got["type"] == cls
    ref = single[accum]
    assert _max_diff(got["sd"], ref["sd"]) < 1e-5  # measured <= 1.8e-7
    assert _max_diff(got["sd"], res["ddp"]["sd"]) < 1e-5
    assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    assert min(ref["norms"]) > 1.0  # clipping at 1.0 was active: the clipped path is what got compared
    if variant.startswith("fsdp"):
        assert got["param_types"] == ["DTensor"]  # really sharded


@pytest.mark.distributed
def test_no_sync_defers_the_reduction(workers):
    _, res = workers
    # DDP: after a micro-step under no_sync each rank still holds the gradient of its own data.
    assert res["ddp_accum2"]["probe"]["after_no_sync"]["max_rank_diff"] > 1e-3
    # FSDP2 keeps the unsharded sum internally and sets the sharded .grad only at the synchronizing backward.
    assert res["fsdp_accum2"]["probe"]["after_no_sync"]["n_grads"] == 0


@pytest.mark.distributed
def test_all_finite_sees_every_ranks_shard(workers):
    _, res = workers
    for variant in ("ddp", "fsdp"):
        assert res[variant]["probe"]["finite"] is True
        assert res[variant]["probe"]["finite_with_nan_on_rank1"] is False  # rank 0 reports rank 1's NaN


@pytest.mark.distributed
def test_fsdp_resume_is_bitwise(workers):
    root, res = workers
    r = res["fsdp_resume"]
    assert _bitwise(r["sd"], res["fsdp"]["sd"])
    assert r["norms"] == res["fsdp"]["norms"][2:]
    assert r["extra"] == {"step": 2, "note": "two steps"}
    # The rebuilt model (another seed) was overwritten by the load: not the 3-step weights, not a fresh init.
    assert not _bitwise(r["loaded_sd"], r["sd"])
    torch.manual_seed(1)
    fresh = ratelab.create_model("test_crate", num_classes=10, img_size=16, in_chans=1).state_dict()
    assert _max_diff(r["loaded_sd"], fresh) > 1e-3
    # Layout: one directory, DCP files of both ranks, extra and strategy.json; nothing left of the swap.
    ckpt_dir = root / "run" / "checkpoints"
    assert Path(r["found"]) == ckpt_dir / "last"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last"]
    names = sorted(p.name for p in (ckpt_dir / "last").iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "extra.pt", "strategy.json"]
    meta = json.loads((ckpt_dir / "last" / "strategy.json").read_text())
    assert meta["world_size"] == 2 and meta["optimizers"] == meta["optimizers_with_state"] == ["main"]


@pytest.mark.distributed
@pytest.mark.filterwarnings(VIEW_WARNING)
def test_fsdp_checkpoint_resumes_on_another_world_size(workers):
    # The 2-process checkpoint, loaded by one process (FSDP makes its own one-member group), then the third step.
    root, res = workers
    strategy, model, wrapped, opt = build("fsdp", ONE, init_seed=1)
    try:
        assert strategy._owns_process_group
        found = strategy.checkpoint_exists(root / "run")
        assert strategy.load_checkpoint(found, model=model, optimizers={"main": opt})["step"] == 2
        train(strategy, model, wrapped, opt, make_batches()[2:])
        sd = strategy.full_state_dict(model)
    finally:
        strategy.close()
    assert not torch.distributed.is_initialized()
    # Resharded exactly; only the summation order of the third step's gradient differs (measured 3e-8).
    assert _max_diff(sd, res["fsdp"]["sd"]) < 1e-6


@pytest.mark.distributed
def test_full_state_dict_has_the_models_own_keys(workers):
    _, res = workers
    own = ratelab.create_model("test_crate", num_classes=10, img_size=16, in_chans=1).state_dict()
    for variant in ("fsdp", "fsdp_ac_wrapper", "ddp"):
        sd = res[variant]["sd"]
        assert list(sd) == list(own), variant  # no module. / _checkpoint_wrapped_module. / _fsdp prefixes
        assert all(v.device.type == "cpu" and not hasattr(v, "placements") for v in sd.values())
        assert all(sd[k].shape == own[k].shape for k in own)
    assert _max_diff(res["fsdp"]["sd"], res["ddp"]["sd"]) < 1e-6  # measured 0


@pytest.mark.distributed
def test_fsdp_activation_checkpointing_and_bf16(workers):
    _, res = workers
    depth = res["fsdp"]["depth"]
    assert res["fsdp"]["block_calls"] == 3 * depth
    for variant in ("fsdp_ac", "fsdp_ac_wrapper"):  # the model's own switch; checkpoint_wrapper
        assert res[variant]["block_calls"] == 2 * 3 * depth, variant  # every block recomputed in backward
        assert _bitwise(res[variant]["sd"], res["fsdp"]["sd"]), variant
    bf16 = res["fsdp_bf16"]
    assert bf16["param_dtypes"] == ["torch.float32"]  # sharded master weights stay fp32
    assert bf16["probe"]["out_dtype"] == "torch.float32" == res["fsdp"]["probe"]["out_dtype"]  # the loss sees fp32
    assert 0 < _max_diff(bf16["sd"], res["fsdp"]["sd"]) < 2e-2  # bf16 compute: close, but not the fp32 run


# ---- one process ---------------------------------------------------------------------------------------------------


class _NoSwitch(nn.Module):
    """Blocks but no set_grad_checkpointing: activation checkpointing must go through checkpoint_wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x)


def _crate() -> nn.Module:
    return ratelab.create_model("test_crate", num_classes=10, img_size=16, in_chans=1)


@pytest.mark.parametrize("make, shape", [(_crate, (4, 1, 16, 16)), (_NoSwitch, (5, 6))])
def test_activation_checkpointing_keeps_outputs_and_gradients(make, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    outs = []
    for ac in (False, True):
        torch.manual_seed(1)
        model = make().train()
        keys = list(model.state_dict())
        calls: list[int] = []
        for blk in model.blocks:
            blk.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        wrapped = SingleStrategy(ONE).wrap(model, activation_checkpointing=ac)
        y = wrapped(x)
        y.square().sum().backward()
        # Parameter order, not names: named_parameters() shows checkpoint_wrapper's inner attribute.
        outs.append((y.detach(), [p.grad for p in model.parameters()], len(calls)))
        assert list(model.state_dict()) == keys  # checkpoint_wrapper does not leak into the keys
    (y0, g0, c0), (y1, g1, c1) = outs
    assert torch.equal(y0, y1)
    assert len(g0) == len(g1) == len(keys) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert c1 == 2 * c0 == 2 * len(model.blocks)  # recomputed in backward: checkpointing really ran


def test_block_units_and_the_error_without_blocks():
    with pytest.raises(ConfigError, match=r"Sequential has no `blocks`.*`fsdp_units\(\)`"):
        FSDPStrategy(ONE).wrap(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="no `blocks`"):
        SingleStrategy(ONE).wrap(nn.Linear(2, 2), activation_checkpointing=True)
    net = _NoSwitch()
    with pytest.raises(ConfigError, match=r"move the model to cuda:0 before wrap \(found tensors on \['cpu'\]\)"):
        FSDPStrategy(DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))).wrap(net)
    assert _block_units(net) == list(net.blocks)
    net.fsdp_units = lambda: [net.stem, *net.blocks]  # a model's own choice wins over `blocks`
    assert _block_units(net) == [net.stem, *net.blocks]
    net.fsdp_units = lambda: []
    with pytest.raises(ConfigError, match="fsdp_units"):
        _block_units(net)


def test_all_finite_one_process():
    s = SingleStrategy(ONE)
    assert s.all_finite([torch.ones(3), torch.zeros(2, 2)]) and s.all_finite([])
    assert not s.all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])


def test_build_strategy_and_options():
    assert type(build_strategy("single", ONE)) is SingleStrategy
    assert type(build_strategy("ddp", ONE)) is SingleStrategy  # one process: no DDP wrapper
    assert type(build_strategy("ddp", TWO)) is DDPStrategy
    assert type(build_strategy("fsdp", ONE)) is FSDPStrategy
    with pytest.raises(ConfigError, match=r"strategy: must be one of \['single', 'ddp', 'fsdp'\], got 'zero3'"):
        build_strategy("zero3", ONE)
    with pytest.raises(ConfigError, match="job of 2 processes"):
        build_strategy("single", TWO)
    with pytest.raises(ConfigError, match="mixed_precision: must be one of"):
        SingleStrategy(ONE).wrap(nn.Linear(2, 2), mixed_precision="fp16")
    with pytest.raises(ConfigError, match="autocast"):
        SingleStrategy(ONE).wrap(nn.Linear(2, 2), mixed_precision="bf16")


def test_single_checkpoint_round_trip(tmp_path):
    batches = make_batches()
    strategy, model, wrapped, opt = build("single", ONE)
    assert strategy.checkpoint_exists(tmp_path) is None
    train(strategy, model, wrapped, opt, batches[:2])
    path = strategy.checkpoint_path(tmp_path)
    assert path == tmp_path / "checkpoints" / "last.pt"
    strategy.save_checkpoint(path, model=model, optimizers={"main": opt}, extra={"step": 2, "rng": [torch.ones(3)]})
    assert strategy.checkpoint_exists(tmp_path) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == ["model", "optimizers", "rng", "step"] and list(raw["model"]) == list(model.state_dict())

    s2, m2, w2, o2 = build("single", ONE, init_seed=1)
    extra = s2.load_checkpoint(path, model=m2, optimizers={"main": o2})
    assert extra["step"] == 2 and torch.equal(extra["rng"][0], torch.ones(3))
    assert _bitwise(m2.state_dict(), model.state_dict())
    train(strategy, model, wrapped, opt, batches[2:])
    train(s2, m2, w2, o2, batches[2:])
    assert _bitwise(m2.state_dict(), model.state_dict())  # optimizer state came back too

    with pytest.raises(ValueError, match=r"reserved keys \['model'\]"):
        strategy.save_checkpoint(path, model=model, optimizers={"main": opt}, extra={"model": 1})
    with pytest.raises(CheckpointError, match=r"holds the optimizers \['main'\], but \['disc', 'gen'\]"):
        s2.load_checkpoint(path, model=m2, optimizers={"gen": o2, "disc": o2})
    with pytest.raises(CheckpointError, match="weights do not match"):
        s2.load_checkpoint(path, model=nn.Linear(2, 2), optimizers={"main": o2})
    with pytest.raises(CheckpointError, match="single/ddp strategy; resume it with --strategy ddp"):
        FSDPStrategy(ONE).checkpoint_exists(tmp_path)


def _fake_dir_ckpt(path: Path, tag: str) -> None:
    path.mkdir(parents=True)
    for name in (".metadata", "strategy.json"):
        (path / name).write_text(tag)


def test_directory_checkpoint_survives_a_kill(tmp_path):
    ckpt = tmp_path / "checkpoints"
    final, tmp, old = ckpt / "last", ckpt / ".last.tmp", ckpt / ".last.old"
    _fake_dir_ckpt(final, "v1")
    (tmp / "partial").mkdir(parents=True)  # killed while writing the next one: the previous stays in use
    assert FSDPStrategy(ONE).checkpoint_exists(tmp_path) == final
    shutil.rmtree(tmp)
    _fake_dir_ckpt(tmp, "v2")
    _commit_dir(tmp, final, old)
    assert (final / ".metadata").read_text() == "v2" and not tmp.exists() and not old.exists()
    # Killed between the two renames of the swap: no `last`, the complete previous one is found instead.
    final.rename(old)
    assert _find_dir_checkpoint(final) == old
    assert FSDPStrategy(ONE).checkpoint_exists(tmp_path) == old
    with pytest.raises(CheckpointError, match="written by the fsdp strategy; resume it with --strategy fsdp"):
        SingleStrategy(ONE).checkpoint_exists(tmp_path)
    with pytest.raises(CheckpointError, match="sharded checkpoint directory"):
        SingleStrategy(ONE).load_checkpoint(old, model=nn.Linear(2, 2), optimizers={})
    (old / "strategy.json").unlink()  # incomplete: nothing to resume from
    assert FSDPStrategy(ONE).checkpoint_exists(tmp_path) is None
