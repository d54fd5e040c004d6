"""Image captioning (Cap / DP-Cap: Tschannen et al. 2023; Sander, Yu et al. ICML 2024).

:class:`CaptionTask` (task ``"caption"``) trains a captioner of the DP-Cap convention -- ``model(images, tokens) ->
(B, L, V)`` next-token logits with teacher forcing, ``pad_id``/``bos_id``/``eos_id`` and ``generate`` -- such as
``dpcap_*``, on an image-caption dataset (``shapes_captions``, ``caption_folder``, ``caption_wds``).

The per-example loss is :meth:`CaptionTask.per_sample_losses`: the cross-entropy of each caption's tokens after
BOS, averaged over its non-pad targets -- a (B,) vector with one entry per image-caption pair, each depending on that
pair only (no batch statistics), which is what DP-SGD clips per sample. :meth:`training_step` is its mean over the
micro-batch, or the vector itself with ``per_sample=True`` (the ``privacy`` plugin's contract: the class declares
``per_sample_loss = True``).

Tokenizer, the first that applies: ``task.tokenizer_path`` (a local ``vocab.txt``, bert-base-uncased's say, or a
``tokenizer.json``); ``task.tokenizer_corpus`` (a WordPiece vocabulary of at most ``task.vocab_size`` entries built
from a local public text file); the dataset's own public word list when it has one (``shapes_captions``: every word
its generator can write, fixed by code); else a vocabulary built from the training split's captions. Building is
deterministic, so a resumed run rebuilds the same one. It is saved as ``out_dir/tokenizer.json`` (with its
provenance, ``tokenizer.provenance.json``).

Privacy: the vocabulary is released with the model (its embedding rows, ``tokenizer.json``) without noise, so one
fit on the private training captions is not covered by DP-SGD's guarantee (a word one caption alone holds names
that caption). Under the ``privacy`` plugin such a tokenizer is refused with a ConfigError naming
``task.tokenizer_path`` and the alternatives, unless ``task.tokenizer_from_private_data=true`` accepts it; the run
then reports no guarantee (``dp_guarantee = 0`` and the reason in ``privacy.json``). The plugin asks through
:meth:`CaptionTask.check_private_release`.

Evaluation: ``val_loss`` (mean per-caption loss over the validation set, all ranks) and, on the first
``n_generate`` validation images, greedy captions: ``val_exact_match`` (share identical to the reference caption
after the tokenizer's normalization) and ``out_dir/captions/step{step}.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ratelab.core.dist import all_reduce_sum
from ratelab.train.tasks import EvalContext, Task, TaskConfig, _dataset_kwargs, register_task

__all__ = ["CaptionTask", "CaptionTaskConfig"]


@dataclass
class CaptionTaskConfig(TaskConfig):
    """Options of the ``caption`` task (``--task caption --task.max_len 40 ...``).

    Attributes:
        tokenizer_path: a local ``vocab.txt`` / ``tokenizer.json`` (or a folder holding one), taken as a public
            vocabulary; None = build one (see the module docstring).
        tokenizer_corpus: a local public text file (one sentence a line) to build the vocabulary from.
        tokenizer_from_private_data: under the ``privacy`` plugin, accept a vocabulary built from the private
            training captions; the run then carries no privacy guarantee (reported so). Without DP: no effect.
        vocab_size: size of the built vocabulary (ignored with ``tokenizer_path``).
        max_len: captions padded / truncated to this many tokens, BOS and EOS included (DP-Cap's command: 40).
        n_generate: validation images captioned greedily at each evaluation (0 = none).
    """

    name: str = "caption"
    tokenizer_path: str | None = None
    tokenizer_corpus: str | None = None
    tokenizer_from_private_data: bool = False
    vocab_size: int = 1000
    max_len: int = 40
    n_generate: int = 16

    def check(self) -> None:
        if self.max_len < 2:
            raise ValueError(f"max_len: must be >= 2 (BOS and EOS), got {self.max_len!r}")
        if self.vocab_size < 6:
            raise ValueError(f"vocab_size: must be >= 6 (five special tokens and a word), got {self.vocab_size!r}")
        if self.n_generate < 0:
            raise ValueError(f"n_generate: must be >= 0, got {self.n_generate!r}")
        if self.tokenizer_path is not None and self.tokenizer_corpus is not None:
            raise ValueError("tokenizer_corpus: give tokenizer_path or tokenizer_corpus, not both")


@register_task("caption", config=CaptionTaskConfig)
class CaptionTask(Task):
    """Captioning with teacher forcing (see the module docstring).

    Args:
        config: a :class:`CaptionTaskConfig` (or its fields as keyword options).
        train_dataset, val_dataset: caption datasets (items ``(image, caption str)``) to use instead of building
            ``cfg.dataset``.
        tokenizer: a :class:`ratelab.data.text_tokenizer.CaptionTokenizer` to use (overrides
            ``task.tokenizer_path``); under DP it must be ``public`` (or ``task.tokenizer_from_private_data``).
    """

    per_sample_loss = True

    def __init__(self, config: CaptionTaskConfig | None = None, *, train_dataset: Dataset | None = None,
                 val_dataset: Dataset | None = None, tokenizer: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        if val_dataset is not None and train_dataset is None:
            raise ValueError("CaptionTask: val_dataset was given without train_dataset")
        self._given = train_dataset is not None
        self.raw_train, self.raw_val = train_dataset, val_dataset
        self.tokenizer = tokenizer
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    # ---- data and model -------------------------------------------------------------------------------------
    def build_tokenizer(self, dataset: Any) -> Any:
        """The task's tokenizer (see the module docstring for the order of sources), built once."""
        from ratelab.data.text_tokenizer import CaptionTokenizer

        if self.tokenizer is not None:
            return self.tokenizer
        c = self.config
        if c.tokenizer_path is not None:
            self.tokenizer = CaptionTokenizer.from_file(c.tokenizer_path)
        elif c.tokenizer_corpus is not None:
            self.tokenizer = CaptionTokenizer.from_corpus(c.tokenizer_corpus, c.vocab_size)
        elif callable(getattr(dataset, "public_vocabulary_text", None)):
            name = getattr(dataset, "name", type(dataset).__name__)
            self.tokenizer = CaptionTokenizer.train(dataset.public_vocabulary_text(), c.vocab_size, public=True,
                                                    source=f"{name}'s public word list (fixed by code)")
        else:
            self.tokenizer = CaptionTokenizer.train(dataset.captions(), c.vocab_size, public=False,
                                                    source="the training captions")
        return self.tokenizer

    def check_private_release(self) -> list[str]:
        """What DP training asks of the task: raise ConfigError when the vocabulary, released without noise, was
        built from the private training captions and nobody accepted that; else return the notes of what was
        accepted (``task.tokenizer_from_private_data``), each voiding the run's guarantee."""
        from ratelab.core.errors import ConfigError

        t = self.tokenizer
        if t is None or getattr(t, "public", False):
            return []
        source = getattr(t, "source", "unknown")
        if self.config.tokenizer_from_private_data:
            return [f"the caption vocabulary was built from {source} (task.tokenizer_from_private_data=true) and is "
                    "released without noise"]
        raise ConfigError(
            f"task.tokenizer_path: under DP (plugins.privacy) the caption vocabulary may not come from {source}: it "
            "is released with the model without noise, so it is not covered by the guarantee. Give "
            "task.tokenizer_path (a public vocab.txt / tokenizer.json, e.g. bert-base-uncased's), "
            "task.tokenizer_corpus (a public text file, one sentence a line), a dataset with a public word list "
            "(shapes_captions), or a CaptionTokenizer marked public=True; or set "
            "task.tokenizer_from_private_data=true to train without a privacy guarantee (reported so)")

    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        from ratelab.data.captions import TokenizedCaptions

        if not self._given:
            from ratelab.data import build_dataset

            common = _dataset_kwargs(cfg)
            self.raw_train = build_dataset(cfg.dataset, "train", augment=cfg.augment, **common)
            self.raw_val = build_dataset(cfg.dataset, "val", **common)
        if self.tokenizer is None and not hasattr(self.raw_train, "captions"):
            from ratelab.core.errors import ConfigError

            raise ConfigError(f"dataset: {cfg.dataset!r} has no captions; the caption task trains on "
                              "shapes_captions, caption_folder or caption_wds")
        self.build_tokenizer(self.raw_train)
        if "privacy" in (getattr(cfg, "plugins", None) or {}):
            self.check_private_release()  # before tokenizer.json is written
        out = getattr(cfg, "out_dir", None)
        if out:
            self.tokenizer.save(Path(out) / "tokenizer.json")
        L = self.config.max_len
        self.train_dataset = TokenizedCaptions(self.raw_train, self.tokenizer, L)
        self.val_dataset = TokenizedCaptions(self.raw_val, self.tokenizer, L) if self.raw_val is not None else None
        return self.train_dataset, self.val_dataset

    def model_kwargs(self, cfg: Any) -> dict[str, Any]:
        """``create_model`` keyword arguments: the tokenizer's vocabulary size and special ids, ``img_size`` and
        ``in_chans`` from the config or the dataset."""
        if self.tokenizer is None:
            raise RuntimeError("CaptionTask.model_kwargs: call build_datasets first (it builds the tokenizer)")
        t = self.tokenizer
        kw = {"vocab_size": t.vocab_size, "pad_id": t.pad_id, "bos_id": t.bos_id, "eos_id": t.eos_id,
              **cfg.model_kwargs}
        for name, value in (("img_size", cfg.img_size), ("in_chans", None)):
            if name not in kw:
                kw[name] = value if value is not None else getattr(self.raw_train, name, None)
        return {k: v for k, v in kw.items() if v is not None}

    def build_model(self, cfg: Any) -> nn.Module:
        from ratelab import create_model

        model = create_model(cfg.model, **self.model_kwargs(cfg))
        if not hasattr(model, "generate") or not hasattr(model, "pad_id"):
            from ratelab.core.errors import ConfigError

            raise ConfigError(f"model: {cfg.model!r} is not a captioner (no generate/pad_id); the caption task "
                              "trains dpcap_* models")
        return model

    # ---- training and evaluation ----------------------------------------------------------------------------
    def per_sample_losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """(B,) per-caption mean cross-entropy over non-pad targets; entry i depends on example i only."""
        from ratelab.models.dpcap.dpcap import caption_loss

        imgs, tokens = batch[0], batch[1]
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        return caption_loss(model(imgs, tokens), tokens, pad)

    def training_step(self, model: nn.Module, batch: Any, cfg: Any,
                      per_sample: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """Images and (B, L) ids -> the mean of :meth:`per_sample_losses` over the micro-batch (``per_sample``: the
        (B,) vector itself)."""
        losses = self.per_sample_losses(model, batch)
        ntok = (batch[1][:, 1:] != self.tokenizer.pad_id).sum(1).float().mean()
        return (losses if per_sample else losses.mean()), {"tokens_per_caption": ntok.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        from ratelab.core.checkpoint import unwrap_model

        out: dict[str, float] = {}
        if ctx.loader is None:
            return out
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        first = None
        for batch in ctx.loader:
            losses = self.per_sample_losses(model, batch)
            sums += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), dtype=torch.float64,
                                                                     device=ctx.device)])
            if first is None:
                first = batch
        loss_sum, n = all_reduce_sum(sums).tolist()
        if n:
            out["val_loss"] = loss_sum / n
        k = self.config.n_generate
        if k and first is not None:
            net = unwrap_model(model)
            imgs, refs = first[0][:k], first[1][:k]
            gen = net.generate(imgs, max_len=self.config.max_len)
            hyp, ref = self.tokenizer.decode(gen), self.tokenizer.decode(refs)
            out["val_exact_match"] = sum(h == r for h, r in zip(hyp, ref)) / len(ref)
            if ctx.dist.is_main and ctx.out_dir is not None:
                d = Path(ctx.out_dir) / "captions"
                d.mkdir(parents=True, exist_ok=True)
                lines = [f"{r}\t->\t{h}" for r, h in zip(ref, hyp)]
                (d / f"step{ctx.step}{'_' + ctx.tag if ctx.tag else ''}.txt").write_text("\n".join(lines) + "\n")
        return out
