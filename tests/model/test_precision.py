"""The residual-stream precision under bf16 autocast, as the encoder docstring states: fp32
hidden states between blocks, bf16 GEMM outputs and branches, bf16 LayerNorm outputs (fp32
statistics), an fp32 final norm."""

import torch

from oneref import OneRef


def test_residual_stream_stays_fp32_under_bf16_autocast():
    model = OneRef.from_config("tiny").eval()
    c = model.config
    seen = {"block": [], "branch": [], "linear": [], "norm": []}

    def record_block(module, inputs, outputs):
        seen["block"].append(outputs[0].dtype)
        seen["branch"].append(outputs[1].dtype)

    hooks = [block.register_forward_hook(record_block) for block in model.encoder.blocks]
    hooks.append(model.encoder.blocks[0].attn.qkv.register_forward_hook(
        lambda m, i, o: seen["linear"].append(o.dtype)))
    hooks.append(model.encoder.blocks[0].norm1.register_forward_hook(
        lambda m, i, o: seen["norm"].append(o.dtype)))
    images = torch.randn(2, 3, c.img_size, c.img_size)
    ids = torch.randint(4, 100, (2, c.max_text_len))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.encode(images, ids, torch.tensor([4, c.max_text_len]))
    for hook in hooks:
        hook.remove()
    assert seen["block"] == [torch.float32] * c.depth and out.vision.dtype == torch.float32
    assert seen["branch"] == [torch.bfloat16] * c.depth
    assert seen["linear"] == [torch.bfloat16] and seen["norm"] == [torch.bfloat16]
