"""Sentencepiece tokenizer with the fairseq id mapping used by BEiT-3 / OneRef (docs/method.md,
"Encoder").

fairseq ids: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, an ordinary piece =
its sentencepiece id + 1, ``<mask>`` = number of sentencepiece pieces + 1 (64001 for
``beit3.spm``). Text is lower-cased; ``<s>`` + pieces + ``</s>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm
import torch

__all__ = ["Tokenizer", "open_tokenizer", "REFSHAPES_TOKENIZER", "recorded_tokenizer",
           "same_tokenizer"]

#: The ``--tokenizer`` value that names RefShapes' built-in vocabulary.
REFSHAPES_TOKENIZER = "refshapes"


class Tokenizer:
    """Wraps a sentencepiece model file (``.model``, e.g. ``beit3.spm``).

    Attributes:
        bos_id, pad_id, eos_id, unk_id: 0, 1, 2, 3.
        mask_id: pieces + 1.
        vocab_size: mask_id + 1, the number of ids this tokenizer can produce.
    """

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, model_path: str | os.PathLike):
        model_path = os.fspath(model_path)
        if os.path.isdir(model_path):
            raise ValueError(f"sentencepiece model {model_path!r} is a folder; give the model "
                             "file (e.g. beit3.spm)")
        if not os.path.isfile(model_path):
            raise ValueError(f"sentencepiece model {model_path!r} does not exist")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"cannot load sentencepiece model {model_path!r}: {err}") from err
        self.num_pieces = self.sp.GetPieceSize()
        self.mask_id = self.num_pieces + 1
        self.vocab_size = self.mask_id + 1
        self._spm_unk = self.sp.unk_id()
        self._word_lengths: dict[str, int] = {}  # word -> number of pieces (word_positions)

    def __getstate__(self) -> dict:
        # Rebuilt from the file on unpickling (DataLoader workers, spawn start method).
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    def check_fits(self, vocab_size: int) -> "Tokenizer":
        """This tokenizer, or ValueError when it produces ids a ``vocab_size``-entry text
        embedding cannot look up."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"tokenizer {self.model_path} produces ids up to "
                             f"{self.vocab_size - 1} but the model's vocabulary has "
                             f"{vocab_size} entries")
        return self

    def _piece_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.EncodeAsIds(text.lower())
        return [self.unk_id if i == self._spm_unk else i + 1 for i in ids]

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """fairseq ids ``[<s>, pieces..., </s>]``; with ``max_len``, pieces are truncated to
        ``max_len - 2`` so the result has at most ``max_len`` ids."""
        pieces = self._piece_ids(text)
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len must be >= 2 (room for <s> and </s>), got {max_len}")
            pieces = pieces[: max_len - 2]
        return [self.bos_id] + pieces + [self.eos_id]

    def longer_than(self, texts: list[str], max_len: int) -> int:
        """How many of ``texts`` :meth:`encode` cuts at ``max_len`` ids (one batched call)."""
        pieces = self.sp.EncodeAsIds([text.lower() for text in texts])
        return sum(len(ids) + 2 > max_len for ids in pieces)

    def encode_padded(self, text: str, max_len: int) -> tuple[torch.Tensor, int]:
        """(ids long (max_len,) padded with 1, length counting <s> and </s>)."""
        ids = self.encode(text, max_len)
        return torch.tensor(ids + [self.pad_id] * (max_len - len(ids)), dtype=torch.long), len(ids)

    def decode(self, ids) -> str:
        """Text of fairseq ids (special ids dropped, ``<unk>`` kept as the spm unk piece)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        spm_ids = []
        for i in ids:
            if i in (self.bos_id, self.pad_id, self.eos_id) or i == self.mask_id:
                continue
            spm_ids.append(self._spm_unk if i == self.unk_id else i - 1)
        return self.sp.DecodeIds(spm_ids)

    def _word_length(self, word: str) -> int:
        """Pieces of one word, remembered (a corpus repeats its words)."""
        length = self._word_lengths.get(word)
        if length is None:
            length = self._word_lengths[word] = len(self._piece_ids(word))
        return length

    def word_positions(self, text: str, word_indices, max_len: int | None = None) -> list[int]:
        """Token position (in :meth:`encode` output, ``<s>`` at 0) of the first piece of each
        whitespace-separated word index in ``word_indices``; -1 for a negative index or a
        word cut by truncation."""
        words = text.split()
        starts, pos = [], 1
        for word in words:
            starts.append(pos)
            pos += self._word_length(word)
        limit = (max_len - 1) if max_len is not None else pos
        out = []
        for w in word_indices:
            w = int(w)
            if w < 0 or w >= len(words) or starts[w] >= limit:
                out.append(-1)
            else:
                out.append(starts[w])
        return out


def open_tokenizer(model_path: str | os.PathLike) -> Tokenizer:
    """:class:`Tokenizer` of the file ``--tokenizer`` (or a run's recorded setting) names;
    its errors name the flag."""
    try:
        return Tokenizer(model_path)
    except ValueError as err:
        raise ValueError(f"--tokenizer: {err}") from None


def recorded_tokenizer(data: dict) -> str | None:
    """The tokenizer a run's recorded data settings (``train_config.json``'s ``data``) read
    text with: a sentencepiece file, :data:`REFSHAPES_TOKENIZER`, or None if not recorded."""
    if not data:
        return None
    if data.get("dataset", "refshapes") == "refshapes":
        return REFSHAPES_TOKENIZER
    return data.get("tokenizer") or None


def same_tokenizer(first: str, second: str) -> bool:
    """Whether two tokenizer settings read text into the same ids: the same setting, or
    files with the same bytes (by name when one is gone: moved, say)."""
    if first == second:
        return True
    if REFSHAPES_TOKENIZER in (first, second):
        return False
    try:
        return Path(first).read_bytes() == Path(second).read_bytes()
    except OSError:
        return Path(first).name == Path(second).name
