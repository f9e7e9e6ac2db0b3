"""Data: the built-in RefShapes dataset, RefCOCO-family readers, the reference transforms, the
fairseq-mapped sentencepiece tokenizer, and MRefM text/image masking.

A sample is a dict::

    image           float (3, S, S)   ImageNet-normalised, zero-padded to S
    text_ids        long (T,)         fairseq ids padded with 1
    text_length     long ()           tokens incl. <s> and </s>
    box             float (4,)        normalised cx, cy, w, h on the padded canvas
    mask            float (S, S)      {0, 1}: segmentation, or the rasterised box
    has_mask        bool              whether ``mask`` is a segmentation
    word_positions  long (2,)         token positions of subject / object words (-1 unknown)
    expression      str
    index           int

:func:`collate` stacks them under plural keys.
"""

from oneref.data.collate import collate
from oneref.data.tokenizer import Tokenizer

_LAZY = {
    "RefShapes": "oneref.data.synthetic",
    "refshapes_tokenizer": "oneref.data.synthetic",
    "refshapes_train_transform": "oneref.data.synthetic",
    "colour_guess_accuracy": "oneref.data.synthetic",
    "colour_guess_masks": "oneref.data.synthetic",
    "ReferringDataset": "oneref.data.refer",
    "load_split_file": "oneref.data.splitfiles",
    "load_refer": "oneref.data.refer_toolkit",
    "TrainTransform": "oneref.data.transforms",
    "TestTransform": "oneref.data.transforms",
    "mask_text": "oneref.data.masking",
    "mask_image": "oneref.data.masking",
}

__all__ = ["collate", "Tokenizer", *_LAZY]


def __getattr__(name):
    # Submodules pull in PIL, pycocotools and the ops layer; import them on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oneref.data' has no attribute {name!r}")
