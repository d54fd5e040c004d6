"""torch.compile paths: the SSD kernel's "compiled" backend, a compiled Mamba-2 mixer, and ``TrainConfig.compile``
(a whole compiled model trained by the Trainer) against their eager twins.

Compilation is slow on a small CPU (inductor writes and builds C++): the shapes are tiny and the tests few.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ratelab.core.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor on CPU needs a C++ compiler")


def test_ssd_compiled_backend_matches_chunked():
    from ratelab.kernels.ssd import ssd

    g = torch.Generator().manual_seed(0)
    b, length, h, p, n = 2, 12, 4, 3, 5
    inputs = dict(x=torch.randn(b, length, h, p, generator=g), dt=torch.randn(b, length, h, generator=g),
                  A=-torch.rand(h, generator=g) * 2 - 0.2, B=torch.randn(b, length, 2, n, generator=g),
                  C=torch.randn(b, length, 2, n, generator=g), D=torch.randn(h, generator=g),
                  dt_bias=torch.randn(h, generator=g), initial_state=torch.randn(b, h, p, n, generator=g))
    cot = torch.randn(b, length, h, p, generator=g)
    res = {}
    for backend in ("chunked", "compiled"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, s = ssd(**leaves, dt_softplus=True, chunk_size=4, return_final_state=True, backend=backend)
        grads = torch.autograd.grad((y * cot).sum() + s.square().sum(), list(leaves.values()))
        res[backend] = (y, s, grads)
    for a, b_ in zip(res["compiled"][:2], res["chunked"][:2], strict=True):
        torch.testing.assert_close(a, b_, atol=2e-5, rtol=2e-5)
    for k, a, b_ in zip(inputs, res["compiled"][2], res["chunked"][2], strict=True):
        torch.testing.assert_close(a, b_, atol=2e-5, rtol=2e-5, msg=lambda m, k=k: f"grad of {k}: {m}")


def test_compiled_model_trains_like_eager(tmp_path, monkeypatch):
    """Two trainer steps of test_adventurer (conv stem, Mamba-2 mixers with the SSD, SwiGLU, head) with --compile:
    the same losses and weights as eager, the same checkpoint keys (no ``_orig_mod.`` prefix).

    The trainer's ``model.compile()`` runs with inductor swapped for ``aot_eager`` here: the same dynamo capture
    and AOT-autograd forward/backward graphs, executed op by op instead of as generated C++ (a cold inductor build
    of this model takes minutes on two cores; the kernel test above runs inductor itself)."""
    from _train_helpers import tiny_config
    from safetensors.torch import load_file

    from ratelab.train import ClassificationTask, Trainer

    calls = []
    original = torch.nn.Module.compile

    def compile_aot_eager(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)

    weights, losses = {}, {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        cfg = tiny_config(out, model="test_adventurer", max_steps=2, epochs=1, batch_size=16, eval_every=0,
                          compile=compiled)
        trainer = Trainer(cfg, ClassificationTask())
        assert (getattr(trainer.model, "_compiled_call_impl", None) is not None) == compiled
        losses[compiled] = trainer.fit()["train_loss"]
        weights[compiled] = load_file(out / "model.safetensors")
    assert calls == ["Adventurer"]
    assert weights[True].keys() == weights[False].keys()
    assert not any(k.startswith("_orig_mod") for k in weights[True])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
    for k, v in weights[False].items():
        torch.testing.assert_close(weights[True][k], v, atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_compile_refuses_model_wrapping_plugins(tmp_path):
    from _train_helpers import tiny_config

    from ratelab.train import ClassificationTask, Trainer
    from ratelab.train.plugins import Plugin

    class Wrapper(Plugin):
        plugin_name = "wrapper"

        def wrap_model(self, model):
            return model

    cfg = tiny_config(tmp_path, max_steps=1, compile=True)
    with pytest.raises(ConfigError, match="compile: plugin"):
        Trainer(cfg, ClassificationTask(), plugins=[Wrapper()])


def test_cli_flag_sets_the_config_field():
    import argparse

    from ratelab.train.config import RESUMABLE_CHANGES, TrainConfig, add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    assert config_from_args(parser.parse_args(["--compile"])).compile is True
    assert config_from_args(parser.parse_args([])).compile is False
    assert "compile" in RESUMABLE_CHANGES  # how to compute, not what: a resumed run may switch it


def test_compiled_mamba2_mixer_matches_eager():
    """One Mamba-2 mixer (in_proj, causal conv, the scan through ``backend="auto"``, gated RMSNorm, out_proj)
    under inductor: output and every parameter gradient as eager. Static shapes, as the trainer compiles: after
    the kernel test above, automatic dynamic shapes would trace the length symbolically, which inductor 2.14
    cannot do here."""
    from ratelab.layers.mamba2 import Mamba2

    torch.manual_seed(0)
    mixer = Mamba2(16, d_state=4, headdim=4, chunk_size=4)
    u = torch.randn(2, 11, 16)
    cot = torch.randn(2, 11, 16)
    res = {}
    for name, fn in (("eager", mixer), ("compiled", torch.compile(mixer, backend="inductor", dynamic=False))):
        mixer.zero_grad(set_to_none=True)
        leaf = u.clone().requires_grad_()
        y = fn(leaf)
        (y * cot).sum().backward()
        res[name] = (y.detach(), leaf.grad, {k: p.grad.clone() for k, p in mixer.named_parameters()})
    torch.testing.assert_close(res["compiled"][0], res["eager"][0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(res["compiled"][1], res["eager"][1], atol=2e-5, rtol=2e-5)
    for k, g in res["eager"][2].items():
        torch.testing.assert_close(res["compiled"][2][k], g, atol=2e-5, rtol=2e-5, msg=lambda m, k=k: f"{k}: {m}")
