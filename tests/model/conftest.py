"""Small inputs for the tiny model."""

import pytest
import torch

from oneref import OneRef


def make_batch(config, batch=2, seed=0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    num_text = config.max_text_len
    images = torch.randn(batch, config.in_chans, config.img_size, config.img_size, generator=gen)
    if lengths is None:
        lengths = torch.randint(2, num_text + 1, (batch,), generator=gen)
    lengths = torch.as_tensor(lengths)
    ids = torch.randint(3, config.vocab_size, (batch, num_text), generator=gen)
    ids[torch.arange(num_text)[None] >= lengths[:, None]] = 1
    ids[:, 0] = 0
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.3, 0.6, 0.3, 0.3], [0.7, 0.3, 0.2, 0.4]])[:batch]
    return images, ids, lengths, boxes


@pytest.fixture
def tiny():
    return OneRef.from_config("tiny", drop_path=0.0)
