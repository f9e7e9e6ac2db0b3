"""Subject/object word fallback and collate checks."""

import pytest
import torch

from oneref.data import collate
from oneref.data import parsing


def test_word_index_from_char_offset():
    text = "the man's hat left of  the car"
    assert parsing._word_index(text, 0) == 0
    assert parsing._word_index(text, text.index("man")) == 1
    assert parsing._word_index(text, text.index("'s")) == 1  # inside a word
    assert parsing._word_index(text, text.index("car")) == 6


def test_no_parser_means_unknown(monkeypatch):
    monkeypatch.setattr(parsing, "_load_spacy", lambda model: None)
    assert parsing.subject_object_words("the red car left of the tree") == (-1, -1)
    assert not parsing.parser_available()


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="lack keys"):
        collate([{"image": torch.zeros(3, 4, 4)}])
