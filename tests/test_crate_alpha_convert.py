"""CRATE-alpha official weights: the PyTorch port's layout and the JAX/Flax tree load with parity, files of other
families are refused by name, and the light recipe's start (init_from_larger_patch).

The reference below is written here from the equations of the design note (§5.1, §5.2), in another style than
ratelab's model (einsum everywhere, a max-shifted softmax, the conv stem as an unfold + matmul), with the module tree
of UCSC-VLAA/CRATE-alpha ``torch_inference/model/crate_alpha.py``, so its ``state_dict()`` has exactly the keys and
shapes of the released ``torch/*.pth`` files: ``conv1``, ``cls_token``, ``pos_embedding``,
``transformer.layers.{i}.{0,1}.{norm,fn}``, ``...0.fn.qkv``, ``...0.fn.to_out.0`` (no biases), ``...1.fn.D``/``D1``
and ``mlp_head.{0,1}``. Its head LayerNorm has PyTorch's default eps 1e-5 like the port (``head_eps``); 1e-6 gives
the JAX model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import ratelab
from ratelab.core.checkpoint import load_model
from ratelab.core.errors import CheckpointError
from ratelab.models import _pretrained as pt
from ratelab.models.crate_alpha.convert import (
    convert_flax,
    convert_official,
    detect_layout,
    init_from_larger_patch,
    load_flax_weights,
    official_to_ratelab_key,
    read_flax_params,
)
from ratelab.models.crate_alpha.crate_alpha import resample_pos_embed_bilinear

try:  # tests/ is on sys.path in pytest's default (rootdir) import mode
    from test_crate_alpha import PARAMS
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.test_crate_alpha import PARAMS

ATOL = RTOL = 1e-5


# ---- independent reference in the official PyTorch layout ---------------------------------------------------------
class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _SubspaceAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.qkv = nn.Linear(dim, heads * dim_head, bias=False)  # U = [U_1 .. U_K]^T, query = key = value
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        w = self.qkv(x).view(B, N, self.heads, self.dim_head)
        s = torch.einsum("bikp,bjkp->bkij", w, w) * self.dim_head**-0.5
        e = (s - s.amax(-1, keepdim=True)).exp()
        out = torch.einsum("bkij,bjkp->bikp", e / e.sum(-1, keepdim=True), w)
        return self.to_out(out.reshape(B, N, -1))


class _OvercompleteStep(nn.Module):
    """A1 = ReLU(eta D^T b - eta lambda); A2 = ReLU(A1 - eta D^T (D A1 - b) - eta lambda); out = D1 A2."""

    def __init__(self, dim: int, eta: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.D = nn.Parameter(torch.randn(dim, 4 * dim) / dim**0.5)
        self.D1 = nn.Parameter(torch.randn(dim, 4 * dim) / dim**0.5)
        self.eta, self.lambd = eta, lambd

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        Dt_b = torch.einsum("jc,bnj->bnc", self.D, b)  # D^T b per token
        a1 = torch.relu(self.eta * Dt_b - self.eta * self.lambd)
        D_a1 = torch.einsum("jc,bnc->bnj", self.D, a1)
        grad = torch.einsum("jc,bnj->bnc", self.D, D_a1 - b)
        a2 = torch.relu(a1 - self.eta * grad - self.eta * self.lambd)
        return torch.einsum("jc,bnc->bnj", self.D1, a2)


class _Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_PreNorm(dim, _SubspaceAttention(dim, heads, dim_head)),
                           _PreNorm(dim, _OvercompleteStep(dim))])
            for _ in range(depth)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for attn, odl in self.layers:
            z = z + attn(z)
            z = z + odl(z)
        return z


class OfficialLayoutCrateAlpha(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 dim_head: int, head_eps: float = 1e-5) -> None:
        super().__init__()
        self.p = patch_size
        n = (image_size // patch_size) ** 2
        self.conv1 = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = _Transformer(dim, depth, heads, dim_head)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim, eps=head_eps), nn.Linear(dim, num_classes))

    def tokens(self, img: torch.Tensor) -> torch.Tensor:
        B = img.shape[0]
        cols = nn.functional.unfold(img, self.p, stride=self.p)  # (B, 3 p p, n): channel-major like the conv
        t = torch.einsum("bkn,dk->bnd", cols, self.conv1.weight.flatten(1)) + self.conv1.bias
        t = torch.cat([self.cls_token.expand(B, -1, -1), t], dim=1) + self.pos_embedding
        return self.transformer(t)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.tokens(img)[:, 0])


def reference(*, dim=32, depth=2, heads=2, image=8, patch=4, classes=10, seed=0, head_eps=1e-5):
    torch.manual_seed(seed)
    ref = OfficialLayoutCrateAlpha(image_size=image, patch_size=patch, num_classes=classes, dim=dim, depth=depth,
                                   heads=heads, dim_head=dim // heads, head_eps=head_eps)
    with torch.no_grad():  # norms and biases random too, so a swapped or dropped key changes the output
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or name == "mlp_head.0.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name in ("pos_embedding", "cls_token"):
                p.mul_(0.5)
    return ref.eval()


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def close(actual, expected, what):
    diff = (actual - expected).abs().max()
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: max {diff:.3g}\n{m}")


# ---- parameter counts of the official layout -------------------------------------------------------------------
SHAPES = {  # name: (d, depth, heads, patch)
    "crate_alpha_tiny_patch16_224": (192, 12, 3, 16),
    "crate_alpha_small_patch16_224": (576, 12, 12, 16),
    "crate_alpha_base_patch32_224": (768, 12, 12, 32),
    "crate_alpha_base_patch16_224": (768, 12, 12, 16),
    "crate_alpha_base_patch8_224": (768, 12, 12, 8),
    "crate_alpha_large_patch32_224": (1024, 24, 16, 32),
    "crate_alpha_large_patch14_224": (1024, 24, 16, 14),
    "crate_alpha_large_patch8_224": (1024, 24, 16, 8),
    "crate_alpha_huge_patch14_224": (1280, 32, 16, 14),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_official_layout_counts(name):
    d, depth, heads, patch = SHAPES[name]
    with torch.device("meta"):
        ref = OfficialLayoutCrateAlpha(image_size=224, patch_size=patch, num_classes=1000, dim=d, depth=depth,
                                       heads=heads, dim_head=d // heads)
        ours = ratelab.create_model(name)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ref == sum(p.numel() for p in ours.parameters()) == PARAMS[name]
    own = ours.state_dict()
    for k, v in ref.state_dict().items():  # same shapes key for key, through the map
        assert own[official_to_ratelab_key(k)].shape == v.shape, k


# ---- the PyTorch port's files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["fast", "ref"])
def test_port_file_loads_with_parity(tmp_path, fused):
    ref = reference()
    path = tmp_path / "alpha.pth"
    torch.save(ref.state_dict(), path)
    assert detect_layout(ref.state_dict()) == "official"
    model = ratelab.create_model("test_crate_alpha", checkpoint_path=path).eval()
    model.set_fused_odl(fused)
    x = images(8)
    with torch.no_grad():
        close(model(x), ref(x), "logits")
        close(model.forward_features(x), ref.tokens(x), "tokens")


def test_wrapped_and_prefixed_port_file(tmp_path):
    ref = reference(seed=3)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 1}, path)
    model = ratelab.create_model("test_crate_alpha", checkpoint_path=path).eval()
    x = images(8)
    with torch.no_grad():
        close(model(x), ref(x), "logits")


def test_other_image_size_resamples_as_the_official_code(tmp_path):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    ref = reference()  # trained at 8 px: a 2 x 2 grid
    torch.save(ref.state_dict(), tmp_path / "a.pth")
    model = ratelab.create_model("test_crate_alpha", img_size=20, checkpoint_path=tmp_path / "a.pth").eval()
    # the official resample_posemb: scipy.ndimage.zoom(order=1) of the grid, [CLS] row kept
    pe = ref.pos_embedding.detach().numpy()
    grid = scipy_ndimage.zoom(pe[0, 1:].reshape(2, 2, -1), (5 / 2, 5 / 2, 1), order=1)
    want = np.concatenate([pe[:, :1], grid.reshape(1, 25, -1)], axis=1)
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), want, atol=1e-6, rtol=0)
    ref.pos_embedding = nn.Parameter(torch.from_numpy(want))
    with torch.no_grad():
        x = images(20)
        close(model(x), ref(x), "logits at 20 px")


def test_release_registry_loads_with_parity(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    monkeypatch.setenv(pt.ENV_VAR, str(root))
    for name, dim, heads, patch in (("crate_alpha_base_patch16_224.in21k_ft_in1k", 768, 12, 16),
                                    ("crate_alpha_large_patch14_224.in21k_ft_in1k", 1024, 16, 14)):
        ref = reference(dim=dim, depth=1, heads=heads, image=224, patch=patch, classes=1000)
        path = root / pt.get_pretrained_cfg(name).file
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ref.state_dict(), path)
        model = ratelab.create_model(name.split(".")[0], pretrained=True, depth=1).eval()
        assert model.pretrained_cfg["tag"] == "in21k_ft_in1k" and model.pretrained_cfg["interpolation"] == "bilinear"
        x = images(224, batch=1)
        with torch.no_grad():
            close(model(x), ref(x), name)


def test_headless_model_drops_the_head(tmp_path):
    ref = reference()
    torch.save(ref.state_dict(), tmp_path / "a.pth")
    model = ratelab.create_model("test_crate_alpha", num_classes=0, checkpoint_path=tmp_path / "a.pth").eval()
    x = images(8)
    with torch.no_grad():
        close(model(x), ref.mlp_head[0](ref.tokens(x)[:, 0]), "pre-logits")  # eps differs by 9e-6: within tol


def test_convert_official_round_trip(tmp_path):
    ref = reference()
    torch.save(ref.state_dict(), tmp_path / "a.pth")
    out = convert_official(tmp_path / "a.pth", tmp_path / "conv", "test_crate_alpha")
    model = load_model(out.parent).eval()
    assert model.num_classes == 10
    x = images(8)
    with torch.no_grad():
        close(model(x), ref(x), "logits")


def test_mismatches_and_other_families_are_refused(tmp_path):
    ref = reference(depth=3)
    torch.save(ref.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match="depth 3 and width 32, the model has depth 2"):
        ratelab.create_model("test_crate_alpha", checkpoint_path=tmp_path / "deep.pth")
    extra = {**reference().state_dict(), "transformer.layers.0.1.fn.ls2": torch.ones(32)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="keys outside the official CRATE-alpha layout.*ls2"):
        ratelab.create_model("test_crate_alpha", checkpoint_path=tmp_path / "extra.pth")

    # a CRATE-alpha file given to CRATE names this family, and a CRATE file given to CRATE-alpha names CRATE
    with pytest.raises(CheckpointError, match=r"CRATE-alpha checkpoint \(official UCSC-VLAA/CRATE-alpha layout; use "
                                              r"a crate_alpha_\* model\)"):
        ratelab.create_model("test_crate", checkpoint_path=tmp_path / "deep.pth")
    ours = ratelab.create_model("test_crate_alpha")
    torch.save(ours.state_dict(), tmp_path / "ours.pth")
    with pytest.raises(CheckpointError, match=r"CRATE-alpha checkpoint \(ratelab layout"):
        ratelab.create_model("test_crate", checkpoint_path=tmp_path / "ours.pth")
    crate = ratelab.create_model("test_crate")
    torch.save(crate.state_dict(), tmp_path / "crate.pth")
    with pytest.raises(CheckpointError, match=r"not a CRATE-alpha checkpoint.*These keys match a CRATE checkpoint"):
        ratelab.create_model("test_crate_alpha", checkpoint_path=tmp_path / "crate.pth")


# ---- the JAX/Flax tree -------------------------------------------------------------------------------------------
def flax_tree(ref: OfficialLayoutCrateAlpha) -> dict:
    """The parameter tree of the official JAX ``models/crate.py`` for ``ref``'s weights, nested as Flax nests it."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    heads, p = ref.transformer.layers[0][0].fn.heads, ref.transformer.layers[0][0].fn.dim_head
    d = sd["cls_token"].shape[-1]
    blocks = {}
    for i in range(len(ref.transformer.layers)):
        pre = f"transformer.layers.{i}."
        blocks[f"encoderblock_{i}"] = {
            "LayerNorm_0": {"scale": sd[pre + "0.norm.weight"], "bias": sd[pre + "0.norm.bias"]},
            "MultiHeadDotProductSubspaceAttention_0": {
                "proj": {"kernel": sd[pre + "0.fn.qkv.weight"].T.reshape(d, heads, p)},  # DenseGeneral (d, K, p)
                "out": {"kernel": sd[pre + "0.fn.to_out.0.weight"].T.reshape(heads, p, d)},  # (K, p, d)
            },
            "LayerNorm_1": {"scale": sd[pre + "1.norm.weight"], "bias": sd[pre + "1.norm.bias"]},
            "OvercompleteISTABlock_0": {"D": sd[pre + "1.fn.D"], "D1": sd[pre + "1.fn.D1"]},
        }
    return {
        "embedding": {"kernel": sd["conv1.weight"].transpose(2, 3, 1, 0), "bias": sd["conv1.bias"]},  # HWIO
        "cls": sd["cls_token"],
        "pos_embedding": sd["pos_embedding"],
        "Transformer": blocks,
        "encoder_norm": {"scale": sd["mlp_head.0.weight"], "bias": sd["mlp_head.0.bias"]},
        "head": {"kernel": sd["mlp_head.1.weight"].T, "bias": sd["mlp_head.1.bias"]},  # Dense (in, out)
    }


def save_npz(tree: dict, path: Path, *, bf16: bool = False) -> None:
    """As big_vision's save_checkpoint: "/"-joined names of {"params", "opt", "chrono"}; bf16 as 2-byte void."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                if bf16:
                    v = torch.from_numpy(np.ascontiguousarray(v)).bfloat16().view(torch.int16).numpy().view("V2")
                flat[f"{prefix}{k}"] = v

    walk({"params": tree, "opt": {"0": {"count": np.zeros(())}}, "chrono": {"step": np.zeros(())}}, "")
    np.savez(path, **flat)


def test_flax_npz_converts_with_parity(tmp_path):
    ref = reference(head_eps=1e-6)  # the JAX model: every LayerNorm at 1e-6
    save_npz(flax_tree(ref), tmp_path / "checkpoint.npz")
    out = convert_flax(tmp_path / "checkpoint.npz", tmp_path / "conv", "test_crate_alpha")
    model = load_model(out.parent).eval()
    x = images(8)
    with torch.no_grad():
        close(model(x), ref(x), "logits")
    # the same tree in memory (nested), straight into a model, and through the filter as a flat tensor dict
    again = load_flax_weights(ratelab.create_model("test_crate_alpha"), flax_tree(ref)).eval()
    flat = read_flax_params(tmp_path / "checkpoint.npz")
    assert detect_layout(flat) == "flax" and detect_layout({f"params/{k}": v for k, v in flat.items()}) == "flax"
    torch.save({f"params/{k}": v for k, v in flat.items()}, tmp_path / "flat.pth")
    third = ratelab.create_model("test_crate_alpha", checkpoint_path=tmp_path / "flat.pth").eval()
    with torch.no_grad():
        close(again(x), ref(x), "logits (dict)")
        close(third(x), ref(x), "logits (flat tensors)")


def test_flax_bfloat16_arrays_are_recovered(tmp_path):
    ref = reference()
    tree = flax_tree(ref)
    save_npz(tree, tmp_path / "bf16.npz", bf16=True)
    params = read_flax_params(tmp_path / "bf16.npz")
    assert params["cls"].dtype == torch.float32
    torch.testing.assert_close(params["cls"], torch.from_numpy(tree["cls"]).bfloat16().float(), atol=0, rtol=0)
    model = load_flax_weights(ratelab.create_model("test_crate_alpha"), tmp_path / "bf16.npz")
    assert torch.equal(model.cls_token.detach(), params["cls"])


def test_flax_tree_outside_the_layout_is_refused(tmp_path):
    tree = flax_tree(reference())
    tree["Transformer"]["encoderblock_0"]["ls1"] = {"layer_scale": np.ones(32, np.float32)}
    with pytest.raises(CheckpointError, match="outside the CRATE-alpha layout.*ls1"):
        load_flax_weights(ratelab.create_model("test_crate_alpha"), tree)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        read_flax_params(tmp_path / "bad.npz")
    with pytest.raises(CheckpointError, match="not found"):
        read_flax_params(tmp_path / "missing.npz")


# ---- light recipe: a smaller patch from a larger-patch model -------------------------------------------------------
def _big_and_small(tmp_path):
    torch.manual_seed(0)
    big = ratelab.create_model("test_crate_alpha", img_size=16)  # patch 4: a 4 x 4 grid
    with torch.no_grad():
        big.patch_embed.proj.bias.normal_()
        big.head.bias.normal_()
    from ratelab.core.checkpoint import save_model

    save_model(big, tmp_path / "big")
    torch.manual_seed(1)
    small = ratelab.create_model("test_crate_alpha", img_size=16, patch_size=2)  # an 8 x 8 grid
    return big, small


@pytest.mark.parametrize("keep_head", [False, True])
def test_init_from_larger_patch(tmp_path, keep_head):
    big, small = _big_and_small(tmp_path)
    fresh = {k: v.clone() for k, v in small.state_dict().items()}
    report = init_from_larger_patch(small, tmp_path / "big", keep_head=keep_head)
    sd, src = small.state_dict(), big.state_dict()
    reinit = {"patch_embed.proj.weight"} | (set() if keep_head else {"head.weight", "head.bias"})
    assert set(report["reinitialized"]) == reinit and report["resampled"] == ["pos_embed"]
    assert set(report["copied"]) == set(sd) - reinit - {"pos_embed"}
    for k in reinit:
        assert torch.equal(sd[k], fresh[k]), k
    for k in report["copied"]:
        assert torch.equal(sd[k], src[k]), k  # the patch bias too, as the official dont_load list
    torch.testing.assert_close(sd["pos_embed"], resample_pos_embed_bilinear(src["pos_embed"], (8, 8)))
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_init_from_larger_patch_official_files(tmp_path):
    ref = reference(image=16, patch=8)  # an official /8 at 16 px: a 2 x 2 grid
    torch.save(ref.state_dict(), tmp_path / "port.pth")
    save_npz(flax_tree(ref), tmp_path / "jax.npz")
    for src in (tmp_path / "port.pth", tmp_path / "jax.npz", ref.state_dict()):
        model = ratelab.create_model("test_crate_alpha", img_size=16)  # /4: a 4 x 4 grid
        report = init_from_larger_patch(model, src, keep_head=True)
        assert report["reinitialized"] == ["patch_embed.proj.weight"] and report["resampled"] == ["pos_embed"]
        torch.testing.assert_close(model.blocks[1].odl.D_hat, ref.transformer.layers[1][1].fn.D1, atol=0, rtol=0)


def test_init_from_larger_patch_errors(tmp_path):
    _, _ = _big_and_small(tmp_path)
    other = ratelab.create_model("test_crate_alpha", img_size=16, patch_size=2, num_classes=3)
    with pytest.raises(CheckpointError, match="keep_head=False"):
        init_from_larger_patch(other, tmp_path / "big", keep_head=True)
    assert init_from_larger_patch(other, tmp_path / "big")["reinitialized"] == [
        "head.bias", "head.weight", "patch_embed.proj.weight"]
    deeper = ratelab.create_model("test_crate_alpha", img_size=16, patch_size=2, depth=3)
    with pytest.raises(CheckpointError, match="missing"):
        init_from_larger_patch(deeper, tmp_path / "big")
    crate = ratelab.create_model("test_crate")
    with pytest.raises(CheckpointError, match="CRATE checkpoint"):
        init_from_larger_patch(ratelab.create_model("test_crate_alpha"), crate.state_dict())


def test_trainer_init_from_agrees(tmp_path):
    """`ratelab train --init-from DIR --init-reinit patch_embed.proj.weight,head` gives the same start."""
    from ratelab.core.init_from import init_from

    _, small = _big_and_small(tmp_path)
    twin = ratelab.create_model("test_crate_alpha", img_size=16, patch_size=2)
    twin.load_state_dict(small.state_dict())
    init_from_larger_patch(small, tmp_path / "big")
    report = init_from(twin, tmp_path / "big", reinit=("patch_embed.proj.weight", "head"))
    assert report.resampled == ["pos_embed"]
    for k, v in small.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


@pytest.mark.parametrize("bf16", [False, True])
def test_flax_npz_loads_through_checkpoint_path(tmp_path, bf16):
    """create_model(checkpoint_path=x.npz): the core reader hands the flat tree to the family's filter."""
    ref = reference(head_eps=1e-6)
    save_npz(flax_tree(ref), tmp_path / "checkpoint.npz", bf16=bf16)
    model = ratelab.create_model("test_crate_alpha", checkpoint_path=str(tmp_path / "checkpoint.npz")).eval()
    direct = load_flax_weights(ratelab.create_model("test_crate_alpha"), tmp_path / "checkpoint.npz").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))
