"""BERT-style WordPiece tokenizer of captions, on Hugging Face ``tokenizers``.

DP-Cap tokenizes with ``bert-base-uncased``: lower-casing BERT normalizer, BERT pre-tokenizer, WordPiece with ``##``
continuations; a caption is ``[CLS] w_1 .. w_n [SEP]`` padded with ``[PAD]`` = 0, [CLS] serving as BOS and [SEP] as
EOS. :class:`CaptionTokenizer` builds that pipeline three ways and never downloads anything:

* :meth:`CaptionTokenizer.train` builds a WordPiece vocabulary from the captions at hand (special tokens first:
  ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4; then characters and frequent whole words);
* :meth:`CaptionTokenizer.from_corpus` does the same from a local public text file (one sentence a line);
* :meth:`CaptionTokenizer.from_file` reads a local ``vocab.txt`` (e.g. bert-base-uncased's, where [CLS] is 101 and
  [SEP] 102) or a ``tokenizer.json`` written by :meth:`save`.

Provenance: a vocabulary is itself a release (a word that only one training caption holds names that caption), so
every tokenizer says where its vocabulary came from (``source``) and whether that is public (``public``).
:meth:`save` writes it beside the vocabulary (``tokenizer.provenance.json``) and :meth:`from_file` reads it back, so
the ``tokenizer.json`` of a run whose vocabulary came from its captions stays non-public; any other file is taken as
public (the user's statement). :meth:`train` is public only when the caller says its text is (``public=True``: a
public corpus, a word list fixed by code). DP training (the ``caption`` task under the ``privacy`` plugin) refuses
a non-public one unless told otherwise, and then reports no guarantee.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ratelab.core.checkpoint import atomic_write_text
from ratelab.core.errors import DatasetError, DatasetNotFound

__all__ = ["SPECIAL_TOKENS", "CaptionTokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _pipeline(model: Any, lowercase: bool) -> Any:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _provenance_path(p: Path) -> Path:
    return p.with_name(f"{p.stem}.provenance.json")


def _read_provenance(p: Path) -> tuple[bool, str]:
    """``(public, source)`` of a tokenizer file: from the provenance file :meth:`CaptionTokenizer.save` wrote beside
    it, else public (a file the user gives is taken at its word)."""
    import json

    side = _provenance_path(p)
    if not side.is_file():
        return True, f"the file {p}"
    try:
        rec = json.loads(side.read_text(encoding="utf-8"))
        public, source = rec["public"], str(rec["source"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"tokenizer provenance file {side}: unreadable ({e}); expected {{\"public\": bool, "
                           "\"source\": str}") from e
    if not isinstance(public, bool):
        raise DatasetError(f"tokenizer provenance file {side}: 'public' must be true or false, got {public!r}")
    return public, f"{source} (saved as {p})"


class CaptionTokenizer:
    """Captions <-> (B, L) id tensors with BOS/EOS/pad conventions of BERT (see the module docstring).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary holds ``[PAD]``, ``[UNK]``, ``[CLS]`` and ``[SEP]``.
        public: whether the vocabulary comes from public data only (see the module docstring).
        source: where the vocabulary came from, in words (for messages and reports).

    Attributes:
        pad_id, bos_id, eos_id, unk_id: ids of [PAD], [CLS], [SEP], [UNK].
        vocab_size: size of the vocabulary (the captioner's embedding and head).
        public, source: the provenance of the vocabulary.
    """

    def __init__(self, tokenizer: Any, *, public: bool = False, source: str = "unknown") -> None:
        from tokenizers.processors import TemplateProcessing

        self.tokenizer = tokenizer
        self.public, self.source = bool(public), str(source)
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS[:4] if t not in vocab]
        if missing:
            raise DatasetError(f"tokenizer vocabulary lacks the special tokens {missing} (BERT-style vocabularies "
                               "have [PAD], [UNK], [CLS] and [SEP])")
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.bos_id, self.eos_id = vocab["[CLS]"], vocab["[SEP]"]
        self.vocab_size = tokenizer.get_vocab_size()
        tokenizer.post_processor = TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", self.bos_id), ("[SEP]", self.eos_id)])
        tokenizer.no_padding()
        tokenizer.no_truncation()

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 1000, *, min_frequency: int = 1,
              lowercase: bool = True, public: bool = False,
              source: str = "the captions given to CaptionTokenizer.train") -> CaptionTokenizer:
        """A WordPiece vocabulary of at most ``vocab_size`` entries (special tokens included) from ``captions``.

        ``public=True`` declares ``captions`` public text (a public corpus, a word list fixed by code); the
        default treats them as the private training captions. ``source`` says what they are.

        Entries, in id order: the special tokens; every character seen, as a word start and as a ``##``
        continuation (so any caption over these characters encodes without [UNK]); then whole words by
        decreasing count (ties in alphabetical order), those seen at least ``min_frequency`` times, until the
        budget is spent. Words left out are split by WordPiece's greedy longest match into the known pieces.

        Deterministic by construction: tokenizers' ``WordPieceTrainer`` breaks frequency ties in hash order
        (measured here: two different vocabularies in five runs on the same shapes captions), which would give a
        repeated or resumed run another vocabulary.

        Raises:
            ValueError: no captions, or a budget too small for the special tokens and the characters.
        """
        from collections import Counter

        from tokenizers import models

        captions = [str(c) for c in captions]
        if not captions:
            raise ValueError("CaptionTokenizer.train: no captions")
        probe = _pipeline(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"), lowercase)
        words: Counter[str] = Counter()
        for c in captions:
            words.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(c)))
        chars = sorted({ch for w in words for ch in w})
        vocab = list(SPECIAL_TOKENS) + chars + [f"##{ch}" for ch in chars]
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens and the {len(chars)} "
                             f"characters of the captions need {len(vocab)} entries")
        known = set(vocab)
        ranked = sorted((w for w, n in words.items() if n >= min_frequency and w not in known),
                        key=lambda w: (-words[w], w))
        vocab += ranked[: vocab_size - len(vocab)]
        model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
        return cls(_pipeline(model, lowercase), public=public, source=source)

    @classmethod
    def from_corpus(cls, path: str | os.PathLike, vocab_size: int = 1000, *, min_frequency: int = 1,
                    lowercase: bool = True) -> CaptionTokenizer:
        """:meth:`train` on a local PUBLIC text file (UTF-8, one sentence or caption a line), ``public=True``.

        Raises:
            DatasetNotFound: no such file. DatasetError: unreadable, or no text (the message names the file).
        """
        p = Path(path)
        if not p.is_file():
            raise DatasetNotFound(f"tokenizer corpus file not found: {path} (give a UTF-8 text file, one sentence a "
                                  "line)")
        try:
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read tokenizer corpus {p}: {e}") from e
        lines = [ln for ln in lines if ln]
        if not lines:
            raise DatasetError(f"tokenizer corpus {p} holds no text")
        try:
            return cls.train(lines, vocab_size, min_frequency=min_frequency, lowercase=lowercase, public=True,
                             source=f"the public corpus {p}")
        except ValueError as e:
            raise DatasetError(f"tokenizer corpus {p}: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, lowercase: bool = True) -> CaptionTokenizer:
        """A local ``vocab.txt`` (one WordPiece entry a line, BERT's format) or a ``tokenizer.json``, taken as a public
        vocabulary (``public=True``) unless the provenance file :meth:`save` wrote beside it says otherwise.

        Raises:
            DatasetNotFound: no such file. DatasetError: a file that is neither (the message names it).
        """
        from tokenizers import Tokenizer, models

        p = Path(path)
        if p.is_dir():  # a model folder: its vocab.txt or tokenizer.json
            for name in ("tokenizer.json", "vocab.txt"):
                if (p / name).is_file():
                    p = p / name
                    break
        if not p.is_file():
            raise DatasetNotFound(f"tokenizer file not found: {path} (give a vocab.txt or a tokenizer.json)")
        public, source = _read_provenance(p)
        try:
            if p.suffix == ".json":
                return cls(Tokenizer.from_file(str(p)), public=public, source=source)
            return cls(_pipeline(models.WordPiece.from_file(str(p), unk_token="[UNK]"), lowercase), public=public,
                       source=source)
        except DatasetError as e:
            raise DatasetError(f"{p}: {e}") from e
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise DatasetError(f"cannot read tokenizer file {p}: {e}") from e

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` atomically (a file path, or a directory to put ``tokenizer.json`` in), and its
        provenance beside it (``tokenizer.provenance.json``: ``public``, ``source``), so that a vocabulary built from
        private captions stays non-public when :meth:`from_file` reads it back."""
        import json

        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")  # per process: ranks may save the same file at once
        self.tokenizer.save(str(tmp))
        os.replace(tmp, p)
        atomic_write_text(json.dumps({"public": self.public, "source": self.source}), _provenance_path(p))
        return p

    # ---- use ----------------------------------------------------------------------------------------------------
    def encode_ids(self, caption: str) -> list[int]:
        """``[BOS] ids.. [EOS]`` of one caption, without padding or truncation."""
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a str, got {type(caption).__name__}")
        return list(self.tokenizer.encode(caption).ids)

    def encode(self, captions: str | Sequence[str], max_len: int | None = None) -> torch.Tensor:
        """Captions -> (B, L) int64 ids, ``[BOS] .. [EOS]`` then ``pad_id``.

        Args:
            max_len: pad every row to this length; a longer caption is cut to ``max_len - 1`` tokens and ends with
                EOS (the released code pads/truncates to 40). None: pad to the longest caption.
        """
        if isinstance(captions, str):
            captions = [captions]
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be >= 2 (BOS and EOS), got {max_len}")
        rows = [self.encode_ids(c) for c in captions]
        if max_len is not None:
            rows = [r if len(r) <= max_len else r[: max_len - 1] + [self.eos_id] for r in rows]
        L = max_len if max_len is not None else max((len(r) for r in rows), default=2)
        out = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Ids -> text, special tokens dropped and cut at the first EOS; a 2-D input gives a list of strings."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(r) for r in ids]  # type: ignore[misc]
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode([i for i in ids if i not in (self.pad_id, self.bos_id)],
                                     skip_special_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"CaptionTokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, "
                f"eos={self.eos_id}, public={self.public})")
