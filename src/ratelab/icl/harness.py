"""In-context-learning harness for any Hugging Face causal LM (``transformers`` interface), loaded from a local path.

Confidence follows the ICL-calibration study (trust.md §3.2): the label distribution is the model's probability of
each label word as the continuation of the prompt, restricted to the K label words and renormalized. A label word
that the tokenizer splits into several tokens is scored by the log-probability of its whole token sequence
(teacher-forced continuation: sum over its tokens of log p(t_j | prompt, t_<j)); when every label word is a single
token this reduces to the next-token distribution at the answer position, computed with one forward per prompt.
The prompt and the label word are tokenized separately and concatenated, so every label word is scored against the
same prompt tokens.

``transformers`` is imported only inside the functions that need it: ``import ratelab.icl`` never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ratelab.icl.datasets import TextDataset
from ratelab.icl.prompts import PromptTemplate, Verbalizer, build_prompt, sample_demonstrations
from ratelab.icl.records import ICLRecords

__all__ = [
    "ICLPlan",
    "PromptRow",
    "label_log_probs",
    "label_log_probs_ref",
    "label_token_ids",
    "load_causal_lm",
    "plan_icl",
    "run_icl",
]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ratelab.icl harness: the Hugging Face 'transformers' package is required "
                          "(pip install transformers)") from e
    return transformers


def load_causal_lm(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load ``AutoModelForCausalLM`` and ``AutoTokenizer`` from a local directory (never from a hub).

    Args:
        path: directory written by ``save_pretrained`` (config + weights + tokenizer files).
        device: where to put the model.
        dtype: optional weight dtype (e.g. torch.bfloat16); default keeps the stored dtype / float32.

    Returns:
        (model in eval mode, tokenizer).
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: model directory not found (expected a local save_pretrained directory)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json; not a Hugging Face model directory")
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot load a tokenizer from this directory ({e})") from e
    kw = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(p), **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot load a causal LM from this directory ({e})") from e
    return model.to(device).eval(), tok


# ----------------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------------


def label_token_ids(tokenizer: Any, verbalizer: Verbalizer) -> list[list[int]]:
    """Token ids of each label word's continuation (no special tokens); errors on empty, unknown or clashing words."""
    out = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for k in range(verbalizer.num_classes):
        text = verbalizer.continuation(k)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"verbalizer: label word {text!r} tokenizes to no tokens")
        if unk is not None and unk in ids:
            raise ValueError(f"verbalizer: label word {text!r} contains the tokenizer's unknown token ({ids})")
        out.append([int(i) for i in ids])
    for a in range(len(out)):
        for b in range(a + 1, len(out)):
            if out[a] == out[b]:
                raise ValueError(f"verbalizer: label words {verbalizer.words[a]!r} and {verbalizer.words[b]!r} "
                                 f"tokenize to the same ids {out[a]}")
    return out


def _max_positions(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for i, ids in enumerate(enc):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} tokenizes to no tokens: {prompts[i][:80]!r}")
    return [list(map(int, ids)) for ids in enc]


def _padded_forward(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """Logits (B, L, V) of a padded batch and the offset (B,) of each sequence's first real token."""
    lens = [len(s) for s in seqs]
    L = max(lens)
    dev = _device(model)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    offset = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        o = L - len(s) if padding_side == "left" else 0
        ids[i, o:o + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, o:o + len(s)] = 1
        offset[i] = o
    kw = {}
    if padding_side == "left":
        # positions must count real tokens only, or left padding would shift every position embedding
        kw["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0).to(dev)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)
    return out.logits, offset


def label_log_probs(model: Any, tokenizer: Any, prompts: Sequence[str], verbalizer: Verbalizer, *,
                    batch_size: int = 8, padding_side: str = "right",
                    progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """log p(label word k | prompt) for each prompt and label word (batched fast path).

    Args:
        model: causal LM returning ``.logits`` of shape (B, L, V) from ``model(input_ids, attention_mask)``.
        tokenizer: its tokenizer.
        prompts: n prompt strings (ending with the answer prefix).
        verbalizer: the K label words.
        batch_size: sequences per forward.
        padding_side: "right" (positions need no adjustment) or "left" (explicit position ids).
        progress: optional callback(done, total) in sequences.

    Returns:
        (n, K) float64 full-vocabulary log-probabilities of each label word's token sequence; ``softmax`` over K
        gives the restricted, renormalized label distribution.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    words = label_token_ids(tokenizer, verbalizer)
    k = len(words)
    prompt_ids = _encode_prompts(tokenizer, prompts)
    single = all(len(w) == 1 for w in words)
    # one sequence per prompt when every word is one token, else one per (prompt, word) with the word appended
    if single:
        seqs = prompt_ids
        owners = [(i, -1) for i in range(len(prompts))]
    else:
        seqs = [p + w for p in prompt_ids for w in words]
        owners = [(i, c) for i in range(len(prompts)) for c in range(k)]
    limit = _max_positions(model)
    longest = max(len(s) for s in seqs)
    if limit is not None and longest > limit:
        i = max(range(len(seqs)), key=lambda j: len(seqs[j]))
        raise ValueError(f"prompt {owners[i][0]} is {longest} tokens long (with its label word), more than the "
                         f"model's {limit} positions; use fewer shots or shorter inputs")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0  # any id works: padded positions are masked / unread
    out = torch.empty(len(prompts), k, dtype=torch.float64)
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))  # similar lengths together: less padding
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                logits, offset = _padded_forward(model, [seqs[j] for j in batch], pad_id, padding_side)
                for r, j in enumerate(batch):
                    i, c = owners[j]
                    o = int(offset[r])
                    if single:
                        last = logits[r, o + len(prompt_ids[i]) - 1].double().log_softmax(-1)
                        out[i] = last[[w[0] for w in words]].cpu()
                    else:
                        w = words[c]
                        p0 = o + len(prompt_ids[i]) - 1  # position predicting the word's first token
                        lp = logits[r, p0:p0 + len(w)].double().log_softmax(-1)
                        out[i, c] = lp[torch.arange(len(w)), torch.tensor(w)].sum().cpu()
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        if was_training:
            model.train()
    return out


def label_log_probs_ref(model: Any, tokenizer: Any, prompts: Sequence[str], verbalizer: Verbalizer) -> torch.Tensor:
    """Reference twin of :func:`label_log_probs`: no padding, no batching, and one forward per scored token.

    For each prompt, word and token j of the word, run the model on ``prompt + word[:j]`` alone and read the
    log-softmax of the last position at ``word[j]``; sum over j. Slow (n * K * tokens forwards) and obviously right.
    """
    words = label_token_ids(tokenizer, verbalizer)
    out = torch.empty(len(prompts), len(words), dtype=torch.float64)
    dev = _device(model)
    model.eval()
    with torch.inference_mode():
        for i, p in enumerate(_encode_prompts(tokenizer, prompts)):
            for c, w in enumerate(words):
                total = 0.0
                for j in range(len(w)):
                    ids = torch.tensor([p + w[:j]], dtype=torch.long, device=dev)
                    logits = model(input_ids=ids).logits[0, -1].double()
                    total += float(logits.log_softmax(-1)[w[j]])
                out[i, c] = total
    return out


# ----------------------------------------------------------------------------------------------------------------
# experiment plan: which queries, which demonstration sets
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRow:
    """One prompt to score: a query (test or calibration) with one demonstration set."""

    split: str  # "test" or "calib"
    example_id: int
    label: int
    shots: int
    prompt_id: int
    query: str
    demos: tuple[int, ...]  # indices into the training dataset, in prompt order
    text: str  # the full prompt


@dataclass
class ICLPlan:
    """Queries and demonstration sets of one ICL run (see :func:`plan_icl`)."""

    test_indices: list[int]  # into the test dataset
    calib_indices: list[int]  # into the training dataset (held out from the demonstration pool)
    demo_pool: list[int]  # training indices eligible as demonstrations
    demo_sets: dict[tuple[int, int], tuple[int, ...]]  # (shots, prompt_id) -> training indices
    rows: list[PromptRow] = field(default_factory=list)


def plan_icl(train: TextDataset, test: TextDataset, *, template: PromptTemplate, verbalizer: Verbalizer,
             shots: Sequence[int] = (0, 1, 2, 4, 8), n_prompt_seeds: int = 5, n_test: int = 300, n_calib: int = 128,
             seed: int = 0) -> ICLPlan:
    """Choose test queries, calibration queries and demonstration sets, and build every prompt.

    * Test queries: ``n_test`` examples of ``test`` (all if fewer), drawn without replacement with ``seed``.
    * Calibration queries: ``n_calib`` examples of ``train``, removed from the demonstration pool (held out).
    * Demonstration pool: the other training examples, minus any whose text equals a test or calibration query, so
      a demonstration set never contains a query.
    * For each k in ``shots``: ``n_prompt_seeds`` demonstration sets (one at k = 0, where all prompts coincide),
      k distinct pool examples each, drawn with a generator seeded by (seed, k, prompt_id). The set is shared by
      every test and calibration query (prompt_id is consistent across the two splits).

    Example ids: test query i -> i; calibration query from training index j -> len(test) + j (disjoint).
    """
    if verbalizer.num_classes != len(train.label_names) or verbalizer.num_classes != len(test.label_names):
        raise ValueError(f"verbalizer has {verbalizer.num_classes} words but the datasets have "
                         f"{len(train.label_names)} (train) / {len(test.label_names)} (test) classes")
    if tuple(train.label_names) != tuple(test.label_names):
        raise ValueError(f"train and test label names differ: {train.label_names} vs {test.label_names}")
    shots = [int(s) for s in shots]
    if not shots or min(shots) < 0 or len(set(shots)) != len(shots):
        raise ValueError(f"shots: expected distinct non-negative integers, got {shots}")
    if n_prompt_seeds < 1:
        raise ValueError(f"n_prompt_seeds: expected >= 1, got {n_prompt_seeds}")
    if n_test < 1 or n_calib < 0:
        raise ValueError(f"n_test must be >= 1 and n_calib >= 0, got n_test={n_test}, n_calib={n_calib}")
    if n_calib >= len(train):
        raise ValueError(f"n_calib={n_calib}: the training set has only {len(train)} examples, and demonstrations "
                         "need some left over")
    rng = np.random.default_rng(seed)
    test_idx = sorted(rng.choice(len(test), size=min(n_test, len(test)), replace=False).tolist())
    calib_idx = sorted(rng.choice(len(train), size=n_calib, replace=False).tolist()) if n_calib else []
    query_texts = {test.texts[i] for i in test_idx} | {train.texts[j] for j in calib_idx}
    held = set(calib_idx)
    pool = [j for j in range(len(train)) if j not in held and train.texts[j] not in query_texts]
    demo_sets: dict[tuple[int, int], tuple[int, ...]] = {}
    for s in shots:
        for pid in range(1 if s == 0 else n_prompt_seeds):
            g = np.random.default_rng([seed, s, pid])
            demo_sets[(s, pid)] = tuple(pool[i] for i in sample_demonstrations(len(pool), s, g))
    plan = ICLPlan(test_idx, calib_idx, pool, demo_sets)
    queries = [("test", i, test.texts[i], test.labels[i]) for i in test_idx]
    queries += [("calib", len(test) + j, train.texts[j], train.labels[j]) for j in calib_idx]
    for (s, pid), demo in demo_sets.items():
        demos = [(train.texts[j], train.labels[j]) for j in demo]
        for split, eid, text, y in queries:
            plan.rows.append(PromptRow(split, eid, y, s, pid, text, demo,
                                       build_prompt(template, verbalizer, demos, text)))
    return plan


def _records(rows: Sequence[PromptRow], scores: torch.Tensor, k: int) -> ICLRecords:
    if not rows:
        return ICLRecords(torch.empty(0, k, dtype=torch.float64), [], [], [], [], torch.empty(0, k))
    return ICLRecords(
        probs=torch.softmax(scores, 1), labels=[r.label for r in rows], shots=[r.shots for r in rows],
        prompt_id=[r.prompt_id for r in rows], example_id=[r.example_id for r in rows], logits=scores,
    )


def run_icl(model: Any, tokenizer: Any, train: TextDataset, test: TextDataset, *,
            template: PromptTemplate | None = None, verbalizer: Verbalizer, shots: Sequence[int] = (0, 1, 2, 4, 8),
            n_prompt_seeds: int = 5, n_test: int = 300, n_calib: int = 128, seed: int = 0, batch_size: int = 8,
            padding_side: str = "right", progress: Callable[[int, int], None] | None = None,
            ) -> tuple[ICLRecords, ICLRecords]:
    """Score every prompt of :func:`plan_icl` and return (test records, calibration records).

    Args:
        model: a causal LM object, or a local directory path (then ``tokenizer`` may be None).
        tokenizer: its tokenizer (None to load it from ``model``'s path).
        train: pool of demonstrations and calibration queries.
        test: pool of test queries.
        template, verbalizer: prompt format and label words (``verbalizer.words[i]`` is the word of class i).
        shots, n_prompt_seeds, n_test, n_calib, seed: see :func:`plan_icl`.
        batch_size, padding_side, progress: see :func:`label_log_probs`.

    Returns:
        (test, calib) ICLRecords with ``logits`` = label-word log-probabilities. Feed them to
        :func:`ratelab.icl.recalibration.summarize` (accuracy / ECE vs shots) and
        :func:`~ratelab.icl.recalibration.evaluate_regimes`.
    """
    if isinstance(model, (str, os.PathLike)):
        loaded, tok = load_causal_lm(model)
        model, tokenizer = loaded, tokenizer if tokenizer is not None else tok
    if tokenizer is None:
        raise ValueError("tokenizer: required when model is an object (pass the model's tokenizer)")
    plan = plan_icl(train, test, template=template or PromptTemplate(), verbalizer=verbalizer, shots=shots,
                    n_prompt_seeds=n_prompt_seeds, n_test=n_test, n_calib=n_calib, seed=seed)
    scores = label_log_probs(model, tokenizer, [r.text for r in plan.rows], verbalizer, batch_size=batch_size,
                             padding_side=padding_side, progress=progress)
    k = verbalizer.num_classes
    split = torch.tensor([r.split == "test" for r in plan.rows], dtype=torch.bool)
    test_rows = [r for r in plan.rows if r.split == "test"]
    calib_rows = [r for r in plan.rows if r.split == "calib"]
    return _records(test_rows, scores[split], k), _records(calib_rows, scores[~split], k)
