"""``torch.compile`` of a training step or an inference forward as one graph (docs/ops.md,
"One graph per step").

Two things keep a step whole:

* dispatch resolved before tracing (:func:`oneref.ops.prepare`): inside the graph each op
  is a dict lookup and metadata checks;
* the MRefM steps gather the masked patches and text positions, whose count depends on the
  masks drawn for the batch: Dynamo traces such ops (``nonzero``, a count read as a size)
  into the graph with an unbacked size instead of breaking it, which needs
  ``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs``. REC, RES and the
  inference forwards have fixed shapes.
"""

from __future__ import annotations

import torch

from oneref import ops

__all__ = ["compile_step"]


def compile_step(module, device: torch.device | str, **options):
    """``torch.compile(module, **options)`` after resolving every op for ``device`` and
    letting Dynamo trace data-dependent sizes (a process-wide Dynamo setting)."""
    ops.prepare(device)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    return torch.compile(module, **options)
