import json

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ratelab.eval.probe import num_prefix_tokens, pool_tokens, pooled_features, probe_encoder


class _TokenEncoder(nn.Module):
    """forward_features -> (B, 1 + 4, d): a [CLS] that carries the class, patch tokens that carry noise only."""

    cls_token = torch.zeros(1)

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.d = d

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, :self.d]
        patches = torch.randn(x.shape[0], 4, self.d, generator=torch.Generator().manual_seed(0))
        return torch.cat([cls[:, None], patches], dim=1)


def _data(n=200, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g) * 0.3
    x[:, 0] += 2.0 * y - 1.0
    return TensorDataset(x, y)


def test_pool_tokens():
    t = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    assert torch.equal(pool_tokens(t, "cls", 1), t[:, 0])
    assert torch.equal(pool_tokens(t, "mean", 1), t[:, 1:].mean(1))
    assert torch.equal(pool_tokens(t, "mean", 0), t.mean(1))
    assert torch.equal(pool_tokens(t[:, 0], "cls", 0), t[:, 0])  # (B, d) features pass through
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        pool_tokens(t, "cls", 0)
    with pytest.raises(ValueError, match="pool"):
        pool_tokens(t, "max", 1)


def test_num_prefix_tokens_reads_timm_and_cls_token():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, num_classes=0,
                            reg_tokens=2)
    assert num_prefix_tokens(vit) == 3
    assert num_prefix_tokens(nn.Linear(2, 2)) == 0


def test_probe_separates_what_the_features_carry():
    """The class lives in the [CLS] token only: the cls probe is near perfect, the mean-pooled one at chance."""
    enc = _TokenEncoder()
    res = probe_encoder(enc, _data(seed=0), _data(seed=1))
    assert res["probe_acc_cls"] >= 0.95
    assert res["probe_acc_mean"] <= 0.65


def test_pooled_features_max_items_and_order():
    enc = _TokenEncoder()
    ds = _data(n=50)
    feats, y = pooled_features(enc, ds, pools=("cls",), batch_size=16, max_items=20)
    assert feats["cls"].shape == (20, 8) and torch.equal(y, ds.tensors[1][:20])
    assert torch.equal(feats["cls"], ds.tensors[0][:20])


def test_probe_needs_forward_features():
    with pytest.raises(TypeError, match="forward_features"):
        probe_encoder(nn.Linear(2, 2), _data(), _data())


@pytest.mark.slow
def test_cli_eval_linear_probe(tmp_path, capsys):
    from ratelab.cli.main import main
    from ratelab.train import TrainConfig, Trainer, build_task

    cfg = TrainConfig(model="crate_pico_patch4_16", dataset="digits", epochs=2, batch_size=128,
                      out_dir=str(tmp_path / "run"), progress=False)
    Trainer(cfg, build_task(cfg)).fit()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--linear-probe", "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "probe_acc_cls" in printed and "probe_acc_mean" in printed
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert 0.5 < ev["linear_probe"]["probe_acc_cls"] <= 1.0  # 10 classes: chance is 0.1
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--linear-probe", "--probe-C", "0"]) == 2
