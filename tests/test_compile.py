"""torch.compile paths: the SSD kernel's custom ops (what a compiled mixer runs) and its "compiled" backend, the
causal conv's traced form, a compiled Mamba-2 mixer, a whole Adventurer without graph breaks, and
``TrainConfig.compile`` (a whole compiled model trained by the Trainer) against their eager twins.

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


def _scan_inputs(seed=0, *, init=True, D=True):
    g = torch.Generator().manual_seed(seed)
    b, length, h, p, n = 2, 13, 4, 3, 5
    out = dict(x=torch.randn(b, length, h, p, generator=g), dt=torch.rand(b, length, h, generator=g) * 0.5,
               A=-torch.rand(h, generator=g) * 2 - 0.2, B=torch.randn(b, length, 2, n, generator=g),
               C=torch.randn(b, length, 2, n, generator=g))
    out["D"] = torch.randn(h, generator=g) if D else None
    out["initial_state"] = torch.randn(b, h, p, n, generator=g) if init else None
    return out


@pytest.mark.parametrize("init,D", [(True, True), (False, False)])
def test_ssd_scan_ops_pass_opcheck(init, D):
    """The custom ops' schema, fake (meta) kernels, autograd registration and dynamo capture as torch checks
    them (``torch.library.opcheck``), for the lean no-grad call and the call that keeps the entering states; and the
    backward op on the states the forward kept."""
    from ratelab.kernels.ssd.library import _scan, _scan_backward

    t = _scan_inputs(init=init, D=D)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["initial_state"], 4, 2)
    for keep in (False, True):
        torch.library.opcheck(_scan, (*args, True, keep))
    y, final, entering = _scan(*args, True, True)
    assert entering.shape[0] == 2  # 13 tokens, chunks of 4 (balanced: 4, 4, 4, 1 -> 4 chunks), 2 per segment
    gy, gf = torch.randn_like(y), torch.randn_like(final)
    torch.library.opcheck(_scan_backward, (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], entering, init, gy, gf,
                                           4, 2, True, init))


def test_compiled_ssd_auto_runs_the_custom_op_and_matches_eager():
    """``backend="auto"`` inside a compiled function captures the scan as ``ratelab::ssd_scan`` (one graph, no
    break, not unrolled per chunk); inductor's values and every gradient equal eager's."""
    from ratelab.kernels.ssd import ssd

    seen = []

    def recording(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    inputs = _scan_inputs(3)

    def f(x, dt, A, B, C, D, initial_state):
        y, s = ssd(x, dt, A, B, C, D, dt_softplus=True, chunk_size=4, initial_state=initial_state,
                   return_final_state=True, backend="auto")
        return (y * y.sin()).sum() + s.square().sum()

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(**leaves)
    assert explained.graph_break_count == 0
    torch.compile(f, backend=recording)(**leaves)
    assert "ratelab.ssd_scan.default" in seen, seen
    assert not any("bmm" in s or "cumsum" in s for s in seen)  # the scan's ops stay inside the custom op
    res = {}
    for name, fn in (("eager", f), ("inductor", torch.compile(f, backend="inductor", dynamic=False))):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        loss = fn(**leaves)
        res[name] = (loss.detach(), torch.autograd.grad(loss, list(leaves.values())))
    torch.testing.assert_close(res["inductor"][0], res["eager"][0], atol=2e-5, rtol=2e-5)
    for k, a, b_ in zip(inputs, res["inductor"][1], res["eager"][1], strict=True):
        torch.testing.assert_close(a, b_, atol=2e-5, rtol=2e-5, msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("width,bias", [(4, True), (2, False)])
def test_traced_causal_conv_matches_eager(width, bias):
    """Under dynamo the causal conv is written as shifted multiply-adds (fused by inductor); traced (aot_eager:
    the same capture without code generation) it equals the eager conv2d form, values and gradients."""
    from ratelab.layers.mamba2 import causal_conv1d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=g)
    w = torch.randn(6, 1, width, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    cot = torch.randn(2, 9, 6, generator=g)
    res = {}
    for name, fn in (("eager", causal_conv1d), ("traced", torch.compile(causal_conv1d, backend="aot_eager"))):
        leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None, activation="silu")
        res[name] = (y.detach(), torch.autograd.grad((y * cot).sum(), leaves))
    torch.testing.assert_close(res["traced"][0], res["eager"][0])
    for a, b_ in zip(res["traced"][1], res["eager"][1], strict=True):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("grad", [False, True])
def test_adventurer_captures_as_one_graph(grad, monkeypatch):
    """A whole Adventurer forward is one dynamo graph, with and without autograd: no graph break per mixer (a
    logging call or a context manager inside the blocks would make one). The SSD dispatcher's once-per-backend
    log is reset, as in a fresh process whose first call is compiled."""
    import ratelab

    monkeypatch.setattr("ratelab.kernels.ssd._logged", set())
    torch.manual_seed(0)
    model = ratelab.create_model("adventurer_tiny_patch16_224", img_size=32, depth=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


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
