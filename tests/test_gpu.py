"""CUDA tier: the same equivalences as the CPU tests, on the GPU, plus a bf16 training run.

Skipped (with the reason shown by ``pytest -ra``) where no CUDA device exists; run on a GPU machine with
``pytest tests/test_gpu.py``.
"""

import pytest
import torch

import ratelab

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU tier)")


def _grads(model, x):
    out = model(x)
    g = torch.randn_like(out, generator=torch.Generator(out.device).manual_seed(1))
    x.grad = None
    model.zero_grad()
    (out * g).sum().backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()], x.grad.detach().clone()


@pytest.mark.parametrize("name", ["crate_tiny_patch16_224", "crate_nano_patch4_16"])
def test_crate_fast_equals_reference_on_cuda(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = ratelab.create_model(name).cuda().double()
    size = model.img_size
    x = torch.randn(4, model.in_chans, size, size, device="cuda", dtype=torch.float64, requires_grad=True)
    out_f, g_f, gx_f = _grads(model, x)
    model.set_attn_backend("ref")
    model.set_fused_ista(False)
    out_r, g_r, gx_r = _grads(model, x)
    torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-8, atol=1e-9)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_crate_bf16_autocast_close_to_fp32():
    model = ratelab.create_model("crate_tiny_patch16_224").cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 5e-2, f"bf16 relative error {rel:.3g}"


def test_coding_rate_cuda_matches_cpu():
    from ratelab.objectives import coding_rate

    Z = torch.randn(3, 500, 64, dtype=torch.float64)
    torch.testing.assert_close(coding_rate(Z.cuda(), 0.5).cpu(), coding_rate(Z, 0.5), rtol=1e-10, atol=1e-10)
    Zb = Z.float().cuda().bfloat16()
    assert coding_rate(Zb, 0.5).dtype == torch.float32


def test_trainer_bf16_on_cuda(tmp_path):
    from ratelab.train import ClassificationTask, TrainConfig, Trainer

    cfg = TrainConfig(model="crate_pico_patch4_16", dataset="digits", img_size=16, epochs=6, batch_size=64,
                      lr=1e-3, out_dir=str(tmp_path), device="cuda", amp="auto", progress=False)
    trainer = Trainer(cfg, ClassificationTask())
    res = trainer.fit()
    assert next(trainer.model.parameters()).is_cuda
    assert res["val_acc"] > 0.3, res  # chance is 0.1; a few epochs of a 4-layer CRATE get well above it


def test_rate_reduction_cuda_matches_cpu():
    from ratelab.objectives.rate_reduction import mcr2_loss, rate_reduction

    Z = torch.randn(1000, 128, dtype=torch.float64)
    y = torch.randint(0, 10, (1000,))
    for a, b in zip(rate_reduction(Z.cuda(), y.cuda(), 0.5), rate_reduction(Z, y, 0.5)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
    Zc = Z.float().cuda().requires_grad_()
    loss, _ = mcr2_loss(Zc.bfloat16(), y.cuda(), 0.5)  # low precision in, float32 rates out
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(Zc.grad).all()


def test_mcr2_task_bf16_on_cuda(tmp_path):
    from ratelab.train import MCR2Task, TrainConfig, Trainer

    cfg = TrainConfig(task="mcr2", model="mcr2_mlp_small", dataset="digits", img_size=8, epochs=4, batch_size=128,
                      out_dir=str(tmp_path), device="cuda", amp="auto", progress=False)
    res = Trainer(cfg, MCR2Task()).fit()
    assert res["val_acc"] > 0.8, res  # nearest subspace on the learned features
