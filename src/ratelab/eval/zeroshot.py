"""Zero-shot classification with a captioner: score each class's caption by its likelihood given the image.

DP-Cap (Sander, Yu et al. ICML 2024, released ``captioning.py``) fills a prompt such as ``"this is a photo of a
{label}"`` with every class name, runs the captioner with teacher forcing on each, and predicts the class whose
caption has the lowest loss (mean cross-entropy over its tokens). :func:`caption_scores` generalizes that to
several prompts per class (aggregated by log-sum-exp of the summed log-likelihoods, i.e. the probability of the
class is the total probability of its captions) and to prompt *prefixes* (``eos=False``: the caption may continue
after the prompt, so EOS is not scored), which is what a captioner trained on structured captions needs.

The image encoder runs once per image; the decoder runs once per (image, prompt) pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["DEFAULT_TEMPLATE", "caption_scores", "zero_shot_accuracy", "zero_shot_predict"]

DEFAULT_TEMPLATE = "this is a photo of a {}"


def _prompts(labels: Sequence[str] | Mapping[str, Sequence[str]], template: str) -> tuple[list[str], list[int]]:
    if isinstance(labels, Mapping):
        texts, owner = [], []
        for k, (_, prompts) in enumerate(labels.items()):
            if isinstance(prompts, str) or not prompts:
                raise ValueError(f"class {k}: give a non-empty list of prompts, got {prompts!r}")
            texts += list(prompts)
            owner += [k] * len(prompts)
        return texts, owner
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' for the label, got {template!r}")
    return [template.format(lab) for lab in labels], list(range(len(labels)))


@torch.no_grad()
def caption_scores(model: nn.Module, tokenizer: Any, images: torch.Tensor,
                   labels: Sequence[str] | Mapping[str, Sequence[str]], *, template: str = DEFAULT_TEMPLATE,
                   eos: bool = True, reduction: str = "mean", chunk: int = 4096) -> torch.Tensor:
    """(B, K) class scores (higher = more likely) of a batch of images.

    Args:
        model: a captioner (``forward_features``, ``forward_decoder``, ``forward_head``, ``pad_id``; ``dpcap_*``).
        tokenizer: the captioner's :class:`ratelab.data.text_tokenizer.CaptionTokenizer`.
        images: (B, C, H, W), normalized as in training.
        labels: K class names (put into ``template``), or a mapping class name -> list of full prompts.
        eos: score the EOS after each prompt (the prompt is a whole caption); False for prompt prefixes.
        reduction: ``"mean"``: minus the mean cross-entropy over the scored tokens (DP-Cap's rule, one prompt per
            class only); ``"sum"``: the summed log-likelihood, aggregated over a class's prompts by log-sum-exp.
        chunk: (image, prompt) pairs per decoder call.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    texts, owner = _prompts(labels, template)
    if reduction == "mean" and len(set(owner)) != len(owner):
        raise ValueError("reduction='mean' takes one prompt per class; use reduction='sum' for several")
    rows = [tokenizer.encode_ids(t) for t in texts]
    if not eos:
        rows = [r[:-1] for r in rows]  # drop the EOS the tokenizer appends
    L = max(len(r) for r in rows)
    pad = model.pad_id
    tok = torch.full((len(rows), L), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tok[i, : len(r)] = torch.tensor(r)
    was_training = model.training
    model.eval()
    try:
        memory = model.forward_features(images)  # (B, T, d)
        B, P = memory.shape[0], len(rows)
        tok = tok.to(memory.device)
        targets = tok[:, 1:]
        keep = (targets != pad).float()
        out = torch.empty(B, P, dtype=torch.float32, device=memory.device)
        pairs = [(b, p) for b in range(B) for p in range(P)]
        for s in range(0, len(pairs), chunk):
            bi = torch.tensor([b for b, _ in pairs[s:s + chunk]], device=memory.device)
            pi = torch.tensor([p for _, p in pairs[s:s + chunk]], device=memory.device)
            logits = model.forward_head(model.forward_decoder(memory[bi], tok[pi]))[:, :-1].float()
            lp = logits.log_softmax(-1).gather(2, targets[pi, :, None])[..., 0] * keep[pi]
            ll = lp.sum(1)
            out[bi, pi] = ll / keep[pi].sum(1) if reduction == "mean" else ll
    finally:
        model.train(was_training)
    K = max(owner) + 1
    if len(owner) == K:
        return out
    own = torch.tensor(owner, device=out.device)
    return torch.stack([out[:, own == k].logsumexp(dim=1) for k in range(K)], dim=1)


def zero_shot_predict(model: nn.Module, tokenizer: Any, images: torch.Tensor,
                      labels: Sequence[str] | Mapping[str, Sequence[str]], **kw: Any) -> torch.Tensor:
    """(B,) predicted class indices: the argmax of :func:`caption_scores`."""
    return caption_scores(model, tokenizer, images, labels, **kw).argmax(dim=1)


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer: Any, data: Any, targets: torch.Tensor,
                       labels: Sequence[str] | Mapping[str, Sequence[str]], *, batch_size: int = 64,
                       device: str | torch.device = "cpu", **kw: Any) -> float:
    """Share of ``data``'s images (a dataset with items ``(image, ...)``, read in order) whose zero-shot prediction
    equals ``targets`` (n,)."""
    from torch.utils.data import DataLoader

    preds = []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        preds.append(zero_shot_predict(model, tokenizer, batch[0].to(device), labels, **kw).cpu())
    pred = torch.cat(preds)
    if pred.shape != targets.shape:
        raise ValueError(f"{len(pred)} images but {len(targets)} targets")
    return float((pred == targets.cpu()).float().mean())
