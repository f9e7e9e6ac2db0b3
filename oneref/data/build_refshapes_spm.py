"""Build the word-level sentencepiece model of the RefShapes grammar.

The shipped file ``oneref/data/assets/refshapes.model`` is the output of::

    python -m oneref.data.build_refshapes_spm

Every grammar word is one piece, so word positions are token positions (+1 for ``<s>``);
with the fairseq mapping the ids stay far below the 1024-entry vocabulary of the tiny and
small presets.
"""

from __future__ import annotations

import argparse
import io
import logging
import os

import sentencepiece as spm

from oneref.data.grammar import VOCABULARY

__all__ = ["ASSET_PATH", "build_refshapes_spm", "main"]

log = logging.getLogger(__name__)

ASSET_PATH = os.path.join(os.path.dirname(__file__), "assets", "refshapes.model")


def build_refshapes_spm(words=VOCABULARY) -> bytes:
    """Serialized sentencepiece model (word type, one piece per word, ids in sorted word
    order, no normalisation beyond the tokenizer's lower-casing)."""
    words = sorted(set(words))
    # A word's frequency decides its id: give word k a count that decreases with k so the
    # piece order is the sorted word order on every platform.
    corpus = []
    for rank, word in enumerate(words):
        corpus.extend([word] * (len(words) - rank))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="word",
        vocab_size=len(words) + 3, character_coverage=1.0, normalization_rule_name="identity",
        num_threads=1, minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    return model.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=ASSET_PATH, help="where to write the .model file")
    args = parser.parse_args(argv)
    data = build_refshapes_spm()
    with open(args.out, "wb") as handle:
        handle.write(data)
    log.info("wrote %s (%d bytes, %d words)", args.out, len(data), len(VOCABULARY))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
