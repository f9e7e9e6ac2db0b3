"""Tokenizer: fairseq id mapping on a small sentencepiece model trained here, and the shipped
RefShapes model."""

import io
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from oneref.data.build_refshapes_spm import ASSET_PATH, build_refshapes_spm
from oneref.data.grammar import VOCABULARY
from oneref.data.synthetic import refshapes_tokenizer
from oneref.data.tokenizer import Tokenizer

CORPUS = [
    "the man on the left holding a red umbrella",
    "woman in blue shirt sitting next to the dog",
    "the small white cat under the table",
    "left zebra", "right giraffe behind the fence", "a bowl of soup near the bread",
] * 20


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                   model_type="unigram", vocab_size=40, num_threads=1,
                                   minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def test_fairseq_mapping(spm_path):
    tok = Tokenizer(spm_path)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    text = "The Man on the LEFT holding a red umbrella"
    pieces = sp.encode(text.lower())
    assert tok.encode(text) == [0] + [p + 1 for p in pieces] + [2]
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.mask_id == sp.get_piece_size() + 1 == 41
    assert tok.vocab_size == 42
    # an unknown character maps to <unk> = 3, never to spm id 0 + 1
    ids = tok.encode("qqq ✓")
    assert 3 in ids and 1 not in ids


def test_truncate_and_pad(spm_path):
    tok = Tokenizer(spm_path)
    text = " ".join(["woman in blue shirt"] * 10)
    full = tok.encode(text)
    assert len(full) > 12
    ids, length = tok.encode_padded(text, 12)
    assert ids.dtype == torch.long and ids.shape == (12,)
    assert length == 12 and ids[0] == 0 and ids[-1] == 2
    assert ids[1:11].tolist() == full[1:11]
    ids, length = tok.encode_padded("left zebra", 12)
    assert length == len(tok.encode("left zebra"))
    assert ids[length:].eq(1).all() and ids[length - 1] == 2
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("x", max_len=1)
    # longer_than counts what encode cuts: exactly max_len ids fit, one more does not
    texts = [text, "left zebra", " ".join(["woman"] * 30)]
    for max_len in (len(full) - 1, len(full), 64):
        assert tok.longer_than(texts, max_len) == sum(len(tok.encode(t)) > max_len
                                                      for t in texts)


def test_word_positions_and_pickle(spm_path):
    tok = Tokenizer(spm_path)
    text = "the small white cat under the table"
    ids = tok.encode(text)
    pos = tok.word_positions(text, [3, 6, -1])
    assert pos[2] == -1
    cat_ids = tok.encode("cat")[1:-1]
    assert ids[pos[0]:pos[0] + len(cat_ids)] == cat_ids
    assert tok.word_positions(text, [6], max_len=4) == [-1]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids


def test_missing_model_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")


def test_shipped_refshapes_model_matches_grammar():
    tok = refshapes_tokenizer()
    pieces = {tok.sp.id_to_piece(i) for i in range(3, tok.num_pieces)}
    assert pieces == {"\u2581" + w for w in VOCABULARY}
    assert tok.mask_id == len(VOCABULARY) + 4 and tok.vocab_size < 1024
    for word in VOCABULARY:
        assert len(tok.encode(word)) == 3, word  # one piece per word
    # rebuilding gives the same pieces in the same order
    rebuilt = spm.SentencePieceProcessor(model_proto=build_refshapes_spm())
    assert [rebuilt.id_to_piece(i) for i in range(rebuilt.get_piece_size())] == \
        [tok.sp.id_to_piece(i) for i in range(tok.num_pieces)]
    with open(ASSET_PATH, "rb") as handle:
        assert handle.read() == build_refshapes_spm()


def test_check_fits_the_model_vocabulary(spm_path):
    tok = Tokenizer(spm_path)
    assert tok.check_fits(tok.vocab_size) is tok
    with pytest.raises(ValueError, match=rf"produces ids up to {tok.vocab_size - 1} but the "
                                         rf"model's vocabulary has 8 entries"):
        tok.check_fits(8)


def test_recorded_and_same_tokenizer(spm_path, tmp_path):
    from oneref.data.tokenizer import recorded_tokenizer, same_tokenizer

    assert recorded_tokenizer({"dataset": "refshapes", "tokenizer": ""}) == "refshapes"
    assert recorded_tokenizer({"dataset": "unc", "tokenizer": "/x/beit3.spm"}) == "/x/beit3.spm"
    assert recorded_tokenizer({"dataset": "unc", "tokenizer": ""}) is None
    assert recorded_tokenizer({}) is None
    copy = tmp_path / "copy.model"
    copy.write_bytes(Path(spm_path).read_bytes())
    assert same_tokenizer(str(spm_path), str(copy))  # the same bytes
    assert not same_tokenizer(str(spm_path), "refshapes")
    other = tmp_path / "other.model"
    other.write_bytes(Path(spm_path).read_bytes()[:-1])
    assert not same_tokenizer(str(copy), str(other))
    assert same_tokenizer(str(copy), "/gone/copy.model")  # moved: judged by its name
