"""Per-kernel counts of the graphs ``torch.compile`` builds, for the speed-of-light report
of the compiled engines (docs/perf.md, "Speed of light").

A :class:`KernelRecorder` hooks inductor's scheduler right after fusion, where each node
is one kernel of the compiled step:

* an extern kernel (the GEMMs, SDPA, custom ops) is counted as the eager counter counts
  the op it calls: FLOPs from ``torch.utils.flop_counter``'s formulas, its tensor
  arguments read and its outputs written (and the further kernels of
  :func:`oneref.bench.kernel_bytes.further_kernels`), shapes and dtypes from the traced
  graph;
* a fused kernel (inductor's generated code: pointwise ops, reductions, casts, in any
  number) is one launch that reads and writes the buffers inductor says it does, each
  once. It is named after the aten ops it fuses (``inductor.add+native_layer_norm``);
* a node that launches nothing (views, reinterpretations) is free.

The forward graph's outputs, less the loss, are what it saves for the backward: their
bytes are the compiled step's saved activations.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from oneref.bench.kernel_bytes import further_kernels, touched_bytes

__all__ = ["KernelRecorder", "empty_counts", "INDUCTOR"]

#: Namespace of the fused kernels inductor generates, in the counts' op names.
INDUCTOR = "inductor"
#: Ops that only relabel memory: left out of a fused kernel's name.
_LAYOUT_OPS = {"view", "reshape", "permute", "expand", "squeeze", "unsqueeze", "t",
               "transpose", "slice", "select", "alias", "_unsafe_view", "as_strided",
               "unbind", "split", "split_with_sizes"}
_NAME_OPS = 3


def empty_counts() -> defaultdict:
    """Per op name: calls (launches), FLOPs, bytes read, bytes written."""
    return defaultdict(lambda: {"calls": 0, "flops": 0.0, "read": 0.0, "written": 0.0})


def _values(arg):
    """The traced values (fake tensors, sizes) of an FX argument structure."""
    return torch.fx.node.map_arg(arg, lambda n: n.meta.get("val"))


def _aten_name(target) -> str | None:
    packet = getattr(target, "overloadpacket", None)
    return None if packet is None else packet.__name__


def _fused_name(node) -> str:
    """``inductor.<the first aten ops it fuses, sorted>`` (``+...`` when there are more)."""
    names = set()
    for sub in node.get_nodes():
        for origin in getattr(sub.node, "origins", ()) if sub.node is not None else ():
            name = _aten_name(origin.target) if origin.op == "call_function" else None
            if name and name not in _LAYOUT_OPS:
                names.add(name)
    ordered = sorted(names) or ["copy"]
    more = "+..." if len(ordered) > _NAME_OPS else ""
    return f"{INDUCTOR}.{'+'.join(ordered[:_NAME_OPS])}{more}"


class KernelRecorder:
    """Record the kernels of every graph inductor compiles for the ``torch.compile`` calls
    made while active (a context manager; ``torch.compile`` takes its copy of inductor's
    config when called; the caches are off so that each graph is scheduled here).

    ``ops``: counts per op name, in :func:`empty_counts`'s format; ``saved_bytes``: the
    bytes the forward graphs hand to their backward."""

    def __init__(self) -> None:
        self.ops = empty_counts()
        self.saved_bytes = 0
        self._patch = None

    def __deepcopy__(self, memo) -> "KernelRecorder":
        # torch.compile keeps a deep copy of inductor's config, the pass among it: the copy
        # must record here.
        return self

    # Inductor's scheduler is imported when a recorder is used: it adds about half a second
    # to the start of every ``oneref bench`` run otherwise.
    def __enter__(self) -> "KernelRecorder":
        from torch._inductor import config as inductor_config

        self._patch = inductor_config.patch(_post_fusion_custom_pass=self._record,
                                            force_disable_caches=True)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(*exc)

    def _record(self, nodes: list) -> list:
        from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode
        from torch._inductor.virtualized import V

        for node in nodes:
            if isinstance(node, NopKernelSchedulerNode):
                continue
            if isinstance(node, ExternKernelSchedulerNode):
                self._record_extern(node)
            else:
                self._add(_fused_name(node), node.estimate_flops() or 0,
                          node.get_read_buffer_sizes(), node.get_write_buffer_sizes())
        if not V.graph.is_backward:
            self.saved_bytes += self._forward_saved_bytes()
        return nodes

    def _record_extern(self, node) -> None:
        from torch._inductor.ir import MultiOutput

        if isinstance(node.node, MultiOutput):  # one output of a kernel counted already
            return
        op = getattr(node.node, "op_overload", None)
        packet = getattr(op, "overloadpacket", None)
        origin = packet and next((o for o in node.node.origins if o.op == "call_function"
                                  and getattr(o.target, "overloadpacket", None) is packet),
                                 None)
        if origin is None:  # no aten op to read it off (a user Triton kernel): as inductor says
            name = f"{op.namespace}.{packet.__name__}" if packet else type(node.node).__name__
            self._add(name, 0, node.get_read_buffer_sizes(), node.get_write_buffer_sizes())
            return
        args, kwargs, out = _values(origin.args), _values(origin.kwargs), origin.meta.get("val")
        counter = flop_registry.get(packet)
        flops = counter(*args, **kwargs, out_val=out) if counter is not None else 0
        name = f"{op.namespace}.{packet.__name__}"
        values = dict(zip((a.name for a in op._schema.arguments), args)) | kwargs
        launches, read, written = further_kernels(name, values)
        self._add(name, flops, touched_bytes(tree_flatten((args, kwargs))[0]) + read,
                  touched_bytes(tree_flatten(out)[0]) + written, 1 + launches)

    def _add(self, name: str, flops: float, read: float, written: float,
             launches: int = 1) -> None:
        record = self.ops[name]
        record["calls"] += launches
        record["flops"] += flops
        record["read"] += read
        record["written"] += written

    @staticmethod
    def _forward_saved_bytes() -> int:
        """Bytes of the forward graph's outputs but its first (the loss)."""
        from torch._inductor.virtualized import V

        output = next(n for n in V.graph.module.graph.nodes if n.op == "output")
        values = tree_flatten(_values(output.args[0]))[0]
        return touched_bytes(values[1:])
