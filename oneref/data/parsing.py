"""Subject / object words of an expression for referring MLM (docs/method.md, "MRefM pre-training").

Order of sources: positions the dataset knows by construction (RefShapes), else a spaCy
dependency parse when spaCy and an English pipeline are installed, else unknown (-1, the
masking rule then picks uniform positions).
"""

from __future__ import annotations

import functools
import logging

__all__ = ["parser_available", "subject_object_words"]

log = logging.getLogger(__name__)

_NOUNS = ("NOUN", "PROPN", "PRON")
_OBJECT_DEPS = ("pobj", "dobj", "obj", "nmod")


@functools.lru_cache(maxsize=1)
def _load_spacy(model: str):
    try:
        import spacy  # optional dependency
    except ImportError:
        return None
    try:
        return spacy.load(model, disable=["ner", "lemmatizer", "textcat"])
    except (OSError, ImportError) as err:
        log.info("spaCy pipeline %r unavailable (%s); subject/object words unknown", model, err)
        return None


def parser_available(model: str = "en_core_web_sm") -> bool:
    return _load_spacy(model) is not None


def _word_index(text: str, char: int) -> int:
    """Whitespace-word index containing character offset ``char``."""
    return len(text[:char].split()) - (0 if char == 0 or text[char - 1].isspace() else 1)


def subject_object_words(text: str, model: str = "en_core_web_sm") -> tuple[int, int]:
    """Whitespace-word indices (subject, object) of ``text``; -1 when unknown or no parser.

    The subject is the head noun of the phrase (the root, or the first noun chunk's root);
    the object is the first prepositional/direct object that is not the subject.
    """
    nlp = _load_spacy(model)
    if nlp is None or not text.strip():
        return -1, -1
    doc = nlp(text)
    subject = next((t for t in doc if t.dep_ == "ROOT" and t.pos_ in _NOUNS), None)
    if subject is None:
        chunk = next(iter(doc.noun_chunks), None)
        subject = chunk.root if chunk is not None else None
    obj = next((t for t in doc if t.dep_ in _OBJECT_DEPS and t.pos_ in _NOUNS
                and t is not subject), None)
    return (_word_index(text, subject.idx) if subject is not None else -1,
            _word_index(text, obj.idx) if obj is not None else -1)
