"""Launch geometry of the LayerNorm kernels, without importing triton: the kernels launch
with it, and ``oneref bench --cost`` counts their partial sums with it."""

from __future__ import annotations

__all__ = ["norm_rows_per_program", "norm_backward_programs"]

#: Elements a LayerNorm program covers on the GPU (768 wide: 4 rows; 3,072 wide: 1).
_ELEMENTS_PER_PROGRAM = 4096


def norm_rows_per_program(width: int) -> int:
    """Rows per LayerNorm program on the GPU for rows of ``width`` (padded to a power of 2)."""
    block = 1 << max(width - 1, 0).bit_length()
    return max(1, _ELEMENTS_PER_PROGRAM // block)


def norm_backward_programs(rows: int, rows_per_program: int, slots: int) -> int:
    """Programs of the LayerNorm backward: one per chunk of ``rows_per_program`` rows, at
    most ``slots`` (two per SM on the GPU); each writes a (4, width) fp32 partial of the
    parameter gradients, which one sum reduces."""
    return max(1, min(-(-rows // rows_per_program), slots))
