"""Recipe ``dpcap``: differentially private captioning on shapes -- do its frozen features hold up at modest epsilon?

Paper: Sander*, Yu*, Sanjabi, Durmus, Ma, Chaudhuri, Guo, "Differentially Private Representation Learning via Image
Captioning", ICML 2024 (arXiv 2403.02506): a captioner trained from scratch with DP-SGD at epsilon = 8 gives frozen
features that linear-probe ImageNet at 65.8% (previous best 56.5%); captioning's loss is a sum of per-example terms,
so per-sample clipping applies (contrastive losses couple the batch).

In small, on the ``shapes_captions`` scenes ("a large red circle in the top left"): ``dpcap_pico_patch4_32`` (4 + 2
layers x 64) trained with the ``caption`` task under the ``privacy`` plugin at epsilon in ``Scale.epsilons`` and
without privacy (epsilon = inf), the same number of steps T for all. Compared on frozen features (the bridge output
averaged over tokens, the paper's probe input), with a linear probe (logistic regression, C = 1) for the main
object's shape, colour and position, against

* the same captioner at random initialization;
* a DP-trained supervised classifier at the same epsilon: the same ViT encoder with a linear head on its mean token,
  trained on the shape label (its probe features: the mean encoder token).

Also: zero-shot accuracy by caption likelihood (shape: the class's prefixes "a {size} {colour} {shape}" summed over
sizes and colours; colour: "a {size} {colour}"), greedy captions of held-out images, and epsilon spent (RDP, PRV).

Privacy accounting: the run is accounted as T steps of Poisson sampling at q = B/N with B = ``Scale.batch`` and
sigma found for the target epsilon (RDP, delta = 1/N). To keep compute small the quick and full scales train with
TAN simulation (Sander, Stock & Sablayrolles, ICML 2023): expected batch B' = ``Scale.tan_batch`` and sigma' =
sigma B'/B, the same noise on the averaged gradient at the same steps. **A TAN run carries no privacy guarantee of its
own**: its epsilon is that of the full-batch run it simulates, reported as ``tan_simulated_epsilon_rdp`` / ``_prv``
(never ``dp_epsilon*``), and every output says so. ``tan_batch=None`` trains the accounted run itself.

Commands (scales in ``SCALES``)::

    ratelab reproduce dpcap --scale quick --out runs/dpcap        # epsilon 1, 8, inf; T = 120, 16 px
    ratelab reproduce dpcap --scale full --out runs/dpcap-full    # epsilon 1, 3, 8, inf; T = 1000, 32 px (not run)

Vocabulary: the caption task's own, from the ``shapes`` generator's word list (public: fixed by code, whatever
scenes are drawn), since one fit on the training captions would be released without noise. Seeds: the TAN arms draw
their DP noise and batches from the recipe's seed (deterministic; they have no guarantee to lose); an accounted arm
(``tan_batch=None``) leaves ``dp_seed`` unset, so its run keeps a formal guarantee, and the summary's ``guarantee``
is what the plugin reported for the arms.

Measured (quick, 1 thread, deterministic; 51 s wall on a 2-core machine shared with other jobs, load about 2; 36 s
quiet in docs/records/demo_quick.json, recorded before the exact Poisson draw and the generator vocabulary;
N = 30,000, B = 480 accounted, B' = 16 trained, T = 120; sigma = 1.167 at epsilon 1 and 0.537 at epsilon 8; the
simulated run's epsilon RDP 0.997 / 7.999, PRV 0.759 / 6.500; TAN simulation, no guarantee). Seed 0, epsilon 1 / 8 /
inf: held-out caption loss 0.940 / 0.894 / 0.734 (it orders with the budget). Linear probes: colour 0.627 / 0.640 /
0.840 against 0.470 at random init (epsilon 8: +17.0 points, 2 SE 8.1) and 0.487 / 0.413 for the DP shape
classifiers; shape 0.273 / 0.277 / 0.267 against 0.267 at random init and 0.227 / 0.250 for the classifiers, which
reach only 0.20 / 0.19 held-out accuracy themselves (this ViT does not learn shape at 16 px in 120 steps even
without privacy: 0.16 measured); position stays at the majority rate (~0.64) for every arm. Zero-shot shape 0.22 /
0.23 / 0.20 (chance 0.17, random init 0.10), colour 0.13 / 0.13 / 0.47 (random init 0.11). Seed 1 (one more run):
loss 0.937 / 0.862 / 0.666, colour probe 0.673 / 0.680 / 0.877 (random init 0.517), zero-shot colour 0.33 / 0.39 /
0.76, zero-shot shape at epsilon 8 0.17: the seed-0 zero-shot colour of the DP arms is at the low end. Greedy
captions are fluent ("a large white circle in the center") with the size and the (mostly central) position right
more often than colour or shape. 4 of 7 checks hold at both seeds: features beat random init on colour at epsilon 8,
the loss and the mean probe accuracy rise with epsilon, epsilon stays within target; the shape claims, the
captioner-vs-classifier claim (colour holds, position does not) and zero-shot shape above chance do not. The paper's
claim in small -- useful features at modest epsilon -- holds only for colour at this scale: the noise on the
averaged gradient (sigma C / B, B = 480) still weighs on 120 steps of a 355k-parameter model; the paper's remedy is a
batch of 1.3M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ratelab.eval.report import Report
from ratelab.recipes import RecipeResult, check, register_recipe
from ratelab.recipes._common import accuracy_difference, logger, resolve_device, train_arm

ATTRS = ("shape", "color", "position")
_PRIVACY_KEYS = ("dp_", "tan_simulated_")  # the privacy plugin's outputs (TAN: tan_simulated_epsilon*)


@dataclass(frozen=True)
class Scale:
    """Settings of one scale.

    Attributes:
        model: captioner entry point.
        img: image side (shapes scenes).
        n_train, n_val: training examples N and held-out images.
        steps: optimizer steps T of every arm.
        batch: the accounted (logical) batch B: q = B / N.
        tan_batch: the trained expected batch B' (TAN simulation; None = train at B, a real guarantee).
        epsilons: target epsilons of the DP arms (inf, the non-private arm, is always added).
        lr: AdamW learning rate (every arm).
        max_len: caption length in tokens.
        n_fit: training images the probes are fitted on.
        n_zero_shot: held-out images scored zero-shot.
        n_samples: held-out images captioned in the report.
    """

    model: str
    img: int
    n_train: int
    n_val: int
    steps: int
    batch: int
    tan_batch: int | None
    epsilons: tuple[float, ...]
    lr: float = 3e-3
    max_len: int = 16
    n_fit: int = 2000
    n_zero_shot: int = 200
    n_samples: int = 6


SCALES = {
    "smoke": Scale("test_dpcap", img=8, n_train=96, n_val=32, steps=2, batch=32, tan_batch=8, epsilons=(8.0,),
                   n_fit=64, n_zero_shot=8, n_samples=2),
    "quick": Scale("dpcap_pico_patch4_32", img=16, n_train=30000, n_val=300, steps=120, batch=480, tan_batch=16,
                   epsilons=(1.0, 8.0), n_zero_shot=100),
    "full": Scale("dpcap_pico_patch4_32", img=32, n_train=20000, n_val=1000, steps=1000, batch=400, tan_batch=64,
                  epsilons=(1.0, 3.0, 8.0), n_zero_shot=500),
}


class EncoderClassifier(nn.Module):
    """A captioner's ViT encoder with a linear head on its mean token: the supervised baseline.

    Only the encoder's modules are kept (the decoder would get no gradient, which DP's per-sample machinery
    refuses). ``features`` is the mean of the encoder's normalized tokens.
    """

    def __init__(self, captioner: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.patch_embed, self.blocks, self.norm = captioner.patch_embed, captioner.blocks, captioner.norm
        self.cls_token, self.pos_embed = captioner.cls_token, captioner.pos_embed
        self.encoder_image_type_embedding = captioner.encoder_image_type_embedding
        self.head = nn.Linear(captioner.embed_dim, num_classes)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = self.patch_embed(x) + self.pos_embed[:, 1:]
        z = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(z.shape[0], -1, -1), z], 1)
        z = z + self.encoder_image_type_embedding
        for blk in self.blocks:
            z = blk(z)
        return self.norm(z).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _features(fn: Any, data: Any, device: torch.device, n: int | None = None) -> torch.Tensor:
    from torch.utils.data import DataLoader, Subset

    if n is not None and n < len(data):
        data = Subset(data, range(n))
    out = []
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=256, shuffle=False):
            out.append(fn(batch[0].to(device)).float().cpu())
    return torch.cat(out)


def _probe(fn: Any, fit: Any, val: Any, labels: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device,
           n_fit: int) -> dict[str, float]:
    from ratelab.eval.subspace import linear_probe

    ftr, fte = _features(fn, fit, device, n_fit), _features(fn, val, device)
    return {a: float(linear_probe(ftr, ytr[: len(ftr)], fte, yte, C=1.0)["test_acc"])
            for a, (ytr, yte) in labels.items()}


def _zero_shot(model: nn.Module, tok: Any, val: Any, labels: dict[str, tuple[torch.Tensor, torch.Tensor]],
               device: torch.device, n: int) -> dict[str, float]:
    from torch.utils.data import Subset

    from ratelab.data.captions import ATTRIBUTES
    from ratelab.data.shapes import SIZE_BANDS
    from ratelab.eval.zeroshot import zero_shot_accuracy

    sizes, colors = list(SIZE_BANDS), ATTRIBUTES["color"]
    prompts = {"shape": {s: [f"a {z} {c} {s}" for z in sizes for c in colors] for s in ATTRIBUTES["shape"]},
               "color": {c: [f"a {z} {c}" for z in sizes] for c in colors}}
    sub = Subset(val, range(min(n, len(val))))
    return {a: zero_shot_accuracy(model, tok, sub, labels[a][1][: len(sub)], p, eos=False, reduction="sum",
                                  device=device) for a, p in prompts.items()}


def _privacy(eps: float, row: Scale, n: int, seed: int) -> dict[str, Any]:
    """The privacy section of an arm at ``eps``: sigma solved once here (RDP, the plugin's default accountant) for
    q = B/N and T steps and handed to the captioner and the classifier alike (the search costs seconds).

    A TAN simulation has no guarantee to lose, so its noise and batches come from the recipe's seed and a
    reproduction repeats exactly. An accounted run (``tan_batch=None``) draws them from fresh OS entropy instead: a
    known seed would let anyone recompute them, and the run would carry no guarantee (the plugin reports
    ``dp_guarantee = 0`` for any known ``dp_seed``)."""
    from ratelab.privacy import find_noise_multiplier

    delta = 1.0 / n
    sigma = find_noise_multiplier(eps, delta, row.batch / n, row.steps, "rdp")
    out: dict[str, Any] = {"noise_multiplier": sigma, "delta": delta, "max_grad_norm": 1.0}
    if row.tan_batch is not None:
        out.update(tan_batch_size=row.tan_batch, dp_seed=seed)
    return out


@register_recipe(
    "dpcap",
    paper="DP-Cap (Sander, Yu et al., ICML 2024)",
    description="a captioner trained with DP-SGD on shapes captions at several epsilon: linear probes of frozen "
                "features (shape, colour, position) against random init, a non-private captioner and a DP "
                "supervised classifier; zero-shot accuracy; captions; epsilon spent (RDP, PRV)",
    scales=SCALES,
    quick_seconds=40,
)
def run(out_dir: Path, *, scale: str, seed: int, device: str, progress: bool) -> RecipeResult:
    import ratelab
    from ratelab.data import build_dataset
    from ratelab.train import CaptionTask, ClassificationTask

    row = SCALES[scale]
    log = logger(progress, "dpcap")
    dev = resolve_device(device)
    common = dict(img_size=row.img, seed=0)
    train = build_dataset("shapes_captions", "train", size=row.n_train, **common)
    fit = build_dataset("shapes_captions", "train", size=min(row.n_fit, row.n_train), augment=False, **common)
    val = build_dataset("shapes_captions", "val", size=row.n_val, **common)
    cls_train, cls_val = train.shapes, val.shapes  # the same scenes as (image, shape label), rendered once
    labels = {a: (fit.attribute_labels(a), val.attribute_labels(a)) for a in ATTRS}
    # The vocabulary from the generator's word list (public: fixed by code), as the caption task builds it: one fit
    # on the training captions would be released without noise, and DP training refuses it.
    tok = CaptionTask(vocab_size=1000).build_tokenizer(train)
    mk = dict(vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, img_size=row.img,
              max_text_len=max(row.max_len, 16))

    def captioner() -> nn.Module:
        return ratelab.create_model(row.model, **mk)

    n = len(train)
    epochs = math.ceil(row.steps * row.batch / n) + 1  # the trainer stops at max_steps
    base = dict(dataset="shapes_captions", img_size=row.img, epochs=epochs, max_steps=row.steps, optimizer="adamw",
                lr=row.lr, weight_decay=0.005, warmup_epochs=0.0, min_lr=row.lr / 10, grad_clip=0.0, eval_every=0)
    task = {"name": "caption", "max_len": row.max_len, "n_generate": 0}
    arms: dict[str, dict[str, Any]] = {}

    torch.manual_seed(seed)
    rand = captioner().to(dev).eval()
    arms["random init"] = {"probe": _probe(rand.features, fit, val, labels, dev, row.n_fit),
                           "zero_shot": _zero_shot(rand, tok, val, labels, dev, row.n_zero_shot)}
    log(f"random init: probe {arms['random init']['probe']}")
    models: dict[str, nn.Module] = {}
    for eps in (*row.epsilons, math.inf):
        name = f"captioner eps={eps:g}"
        dp = math.isfinite(eps)
        cfg = dict(base, batch_size=row.batch if dp else (row.tan_batch or row.batch),
                   plugins={"privacy": _privacy(eps, row, n, seed)} if dp else {})
        if dp:
            log(f"eps={eps:g}: sigma={cfg['plugins']['privacy']['noise_multiplier']:.4f} for q={row.batch / n:.4g}, "
                f"T={row.steps}")
        r = train_arm(name, captioner, train_dataset=train, val_dataset=val, out_dir=out_dir, seed=seed,
                      device=device, progress=False, task_cls=CaptionTask, task_kwargs={"tokenizer": tok},
                      task=task, **cfg)
        m = models[name] = r["model"]
        f = r["final"]
        arms[name] = {"epsilon": eps, "val_loss": float(f["val_loss"]), "time_s": float(f["time_s"]),
                      "probe": _probe(m.features, fit, val, labels, dev, row.n_fit),
                      "zero_shot": _zero_shot(m, tok, val, labels, dev, row.n_zero_shot),
                      **{k: float(v) for k, v in f.items() if k.startswith(_PRIVACY_KEYS)}}
        log(f"{name}: val loss {f['val_loss']:.3f}, probe {arms[name]['probe']}, zero-shot {arms[name]['zero_shot']}")
        if dp:
            cname = f"DP classifier eps={eps:g}"
            rc = train_arm(cname, lambda: EncoderClassifier(captioner(), 6), train_dataset=cls_train,
                           val_dataset=cls_val, out_dir=out_dir, seed=seed, device=device, progress=False,
                           task_cls=ClassificationTask, task="classification",
                           **dict(cfg, dataset="shapes"))
            fc = rc["final"]
            arms[cname] = {"epsilon": eps, "val_acc": float(fc["val_acc"]), "time_s": float(fc["time_s"]),
                           "probe": _probe(rc["model"].features, fit, val, labels, dev, row.n_fit),
                           **{k: float(v) for k, v in fc.items() if k.startswith(_PRIVACY_KEYS)}}
            log(f"{cname}: val acc {fc['val_acc']:.3f}, probe {arms[cname]['probe']}")

    # ---- samples ----------------------------------------------------------------------------------------------
    imgs = torch.stack([val[i][0] for i in range(row.n_samples)]).to(dev)
    refs = [val[i][1] for i in range(row.n_samples)]
    samples = {name: tok.decode(m.generate(imgs, max_len=row.max_len)) for name, m in models.items()}

    # ---- claims -------------------------------------------------------------------------------------------------
    n_val = len(val)
    e_hi = max(row.epsilons)
    cap, clf, rnd = arms[f"captioner eps={e_hi:g}"], arms[f"DP classifier eps={e_hi:g}"], arms["random init"]
    chance_shape = 1 / 6
    vs_rand = accuracy_difference([cap["probe"]["shape"]], [rnd["probe"]["shape"]], n_val)
    col_rand = accuracy_difference([cap["probe"]["color"]], [rnd["probe"]["color"]], n_val)
    losses = [arms[f"captioner eps={e:g}"]["val_loss"] for e in (*row.epsilons, math.inf)]
    other = {a: accuracy_difference([cap["probe"][a]], [clf["probe"][a]], n_val) for a in ("color", "position")}
    order = [arms[f"captioner eps={e:g}"]["probe"] for e in (*row.epsilons, math.inf)]
    mean_probe = [float(np.mean([p[a] for a in ATTRS])) for p in order]
    zs = cap["zero_shot"]["shape"]
    zs_se = 2 * math.sqrt(chance_shape * (1 - chance_shape) / min(row.n_zero_shot, n_val))
    tan = row.tan_batch is not None
    ek = "tan_simulated_epsilon" if tan else "dp_epsilon"  # the plugin's names: a TAN run's epsilon is not its own
    eps_ok = all(arms[f"captioner eps={e:g}"].get(f"{ek}_rdp", math.inf) <= e * 1.01 for e in row.epsilons)
    checks = [
        check(f"useful features at modest epsilon: the captioner at eps={e_hi:g} probes shape better than its "
              "random-init encoder, beyond 2 SE", bool(vs_rand["better"]),
              f"{cap['probe']['shape']:.3f} vs {rnd['probe']['shape']:.3f} ({100 * vs_rand['diff']:+.1f} points, "
              f"2 SE = {100 * vs_rand['two_se']:.1f})"),
        check(f"the captioner at eps={e_hi:g} probes colour better than its random-init encoder, beyond 2 SE",
              bool(col_rand["better"]), f"{cap['probe']['color']:.3f} vs {rnd['probe']['color']:.3f} "
              f"({100 * col_rand['diff']:+.1f} points, 2 SE = {100 * col_rand['two_se']:.1f})"),
        check("the held-out caption loss falls as epsilon grows (inf last)",
              all(a >= b for a, b in zip(losses, losses[1:])),
              ", ".join(f"eps={e:g}: {v:.3f}" for e, v in zip((*row.epsilons, math.inf), losses))),
        check(f"at eps={e_hi:g} the captioner's features carry colour and position better than those of a DP "
              "classifier trained on shape labels, beyond 2 SE", all(o["better"] for o in other.values()),
              "; ".join(f"{a}: {cap['probe'][a]:.3f} vs {clf['probe'][a]:.3f}" for a in other)),
        check("more privacy budget, better features: the mean probe accuracy rises with epsilon (inf last)",
              all(a <= b + 1e-9 for a, b in zip(mean_probe, mean_probe[1:])),
              ", ".join(f"eps={e:g}: {p:.3f}" for e, p in zip((*row.epsilons, math.inf), mean_probe))),
        check(f"zero-shot shape classification by caption likelihood at eps={e_hi:g} beats chance (1/6) beyond 2 SE",
              zs - chance_shape > zs_se, f"{zs:.3f} vs {chance_shape:.3f} (2 SE = {zs_se:.3f})"),
        check("the epsilon spent (RDP) stays within each target" + (" (TAN simulation: of the simulated run)"
                                                                    if tan else ""), eps_ok,
              ", ".join(f"target {e:g}: RDP {arms[f'captioner eps={e:g}'].get(f'{ek}_rdp', math.nan):.3f}, "
                        f"PRV {arms[f'captioner eps={e:g}'].get(f'{ek}_prv', math.nan):.3f}"
                        for e in row.epsilons)),
    ]
    # What the plugin reported, not what the scale intends: every DP arm must carry the guarantee for the claim.
    formal = all(a["dp_guarantee"] == 1.0 for a in arms.values() if "dp_guarantee" in a)
    summary: dict[str, Any] = {"guarantee": "(epsilon, delta)-DP: DP-SGD with Poisson sampling" if formal else
                               "none (TAN simulation)" if tan else "none (see each arm's privacy.json)"}
    for name, a in arms.items():
        for attr, acc in a["probe"].items():
            summary[f"probe {attr} {name}"] = acc
        for attr, acc in a.get("zero_shot", {}).items():
            summary[f"zero-shot {attr} {name}"] = acc
    summary["train_time_s"] = float(sum(a.get("time_s", 0.0) for a in arms.values()))
    results = {"summary": summary, "checks": checks, "arms": arms, "samples": {"reference": refs, **samples},
               "tokenizer_vocab_size": tok.vocab_size}

    # ---- report -------------------------------------------------------------------------------------------------
    report = Report("DP-Cap on shapes captions")
    report.text(
        f"Scale {scale}: {row.model} at {row.img} px, N = {n} training captions, T = {row.steps} steps for every arm, "
        f"accounted batch B = {row.batch} (q = {row.batch / n:.3g}), delta = 1/N, C = 1, Poisson sampling, ghost "
        "clipping. " + (f"TAN simulation: trained with expected batch B' = {row.tan_batch} and sigma' = sigma B'/B; "
                        "these runs carry NO privacy guarantee of their own, the epsilon is that of the simulated "
                        "full-batch run. " if tan else "")
        + f"Linear probes (logistic regression, C = 1) fitted on {min(row.n_fit, n)} un-augmented training images, "
        f"scored on {n_val} held-out images.")
    report.heading("Claims")
    report.checks(checks)
    report.heading("Linear probes of frozen features")
    report.table([[name, a.get("epsilon", math.nan), *[a["probe"][x] for x in ATTRS],
                   a.get("dp_noise_multiplier", math.nan), a.get(f"{ek}_rdp", math.nan),
                   a.get(f"{ek}_prv", math.nan)] for name, a in arms.items()],
                 headers=["arm", "target eps", "shape", "colour", "position", "sigma",
                          *(("simulated eps RDP", "simulated eps PRV") if tan else ("eps RDP", "eps PRV"))])
    report.heading("Zero-shot by caption likelihood")
    report.table([[name, a["zero_shot"]["shape"], a["zero_shot"]["color"]] for name, a in arms.items()
                  if "zero_shot" in a], headers=["captioner", "shape", "colour"])
    report.heading("Captions of held-out images (greedy)")
    report.table([[i, refs[i], *[samples[k][i] for k in samples]] for i in range(len(refs))],
                 headers=["image", "reference", *samples])
    return RecipeResult(results, report)
