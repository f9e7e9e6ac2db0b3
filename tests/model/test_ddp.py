"""Single-process gloo DDP: every entry point runs through forward(task=...) and, with
``touch_unused_parameters``, DDP without ``find_unused_parameters`` accepts steps that leave
heads idle."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from oneref import OneRef
from tests.model.conftest import make_batch


@pytest.fixture
def process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.slow  # importing DDP's dependencies alone takes ~10 s on the shared CPUs
def test_alternating_mrefm_steps_under_ddp(process_group):
    model = OneRef.from_config("tiny", drop_path=0.0)
    model.touch_unused_parameters = True
    ddp = DDP(model, find_unused_parameters=False)
    c = model.config
    images, ids, lengths, boxes = make_batch(c)
    image_mask = torch.zeros(2, c.num_patches, dtype=torch.bool)
    image_mask[:, ::2] = True
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    targets = torch.randint(0, c.mim_vocab, (2, c.num_patches))
    losses = []
    for step in range(4):
        if step % 2 == 0:
            out = ddp(images, ids, lengths, boxes, image_mask, targets, task="mim_loss")
        else:
            out = ddp(images, ids, lengths, boxes, labels, task="mlm_loss")
        out["loss"].backward()
        losses.append(out["loss"].item())
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)
    rec = ddp(images, ids, lengths, task="rec")
    model.rec_loss(rec, boxes)["loss"].backward()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
