"""Small reusable layers of the multiway encoder.

* :class:`MultiwayLinear` - two ``nn.Linear`` experts (``A`` for vision rows, ``B`` for text
  rows) applied in one call of :func:`oneref.ops.multiway_linear` (no split/cat copies).
* :class:`MultiwayLayerNorm` - two LayerNorm experts applied in one call of
  :func:`oneref.ops.multiway_layer_norm`.
* :class:`DropPath` - per-sample stochastic depth on a residual branch.
* :class:`MLP` - the ReLU multi-layer perceptron of the heads (``layers.0``, ``layers.1``, ...).

Shapes: B = batch, S = joint sequence length, D = features. ``num_vision`` is the number of
leading rows of each sample that belong to the vision expert (577 for OneRef-B).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from oneref import ops

__all__ = ["MultiwayLinear", "MultiwayLayerNorm", "DropPath", "MLP"]


class MultiwayLinear(nn.Module):
    """``y[:, :num_vision] = A(x[:, :num_vision])``, ``y[:, num_vision:] = B(x[:, num_vision:])``.

    Args:
        in_features, out_features: sizes of each expert's ``nn.Linear``.
        bias: whether both experts carry a bias.
        activation: ``"none"`` or ``"gelu"`` (exact erf GELU fused into the op).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "none") -> None:
        super().__init__()
        self.A = nn.Linear(in_features, out_features, bias=bias)
        self.B = nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor, num_vision: int) -> torch.Tensor:
        """x: (B, S, in_features) -> (B, S, out_features)."""
        return ops.multiway_linear(x, num_vision, self.A.weight, self.A.bias, self.B.weight,
                                   self.B.bias, activation=self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class MultiwayLayerNorm(nn.Module):
    """LayerNorm with expert ``A``'s affine parameters on the first ``num_vision`` rows and
    ``B``'s on the rest, in one call of :func:`oneref.ops.multiway_layer_norm`.

    ``activation="gelu"`` normalises GELU(x) (the FFN's sub-LN with the activation before it
    fused in); :meth:`add` also performs the residual add before the norm."""

    def __init__(self, dim: int, eps: float = 1e-5, activation: str = "none") -> None:
        super().__init__()
        self.A = nn.LayerNorm(dim, eps=eps)
        self.B = nn.LayerNorm(dim, eps=eps)
        self.activation = activation

    def _params(self):
        return self.A.weight, self.A.bias, self.B.weight, self.B.bias, self.A.eps

    def forward(self, x: torch.Tensor, num_vision: int, out_dtype=None) -> torch.Tensor:
        """x: (B, S, D) -> (B, S, D) in ``out_dtype`` (default: the autocast dtype under
        autocast, else x's)."""
        return ops.multiway_layer_norm(x, num_vision, *self._params(), self.activation,
                                       out_dtype)

    def add(self, x: torch.Tensor, branch: torch.Tensor, num_vision: int,
            branch_scale: torch.Tensor | None = None, out_dtype=None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = x + branch_scale * branch`` and this norm of h: returns (h, LN(h))."""
        return ops.multiway_add_layer_norm(x, branch, num_vision, *self._params(),
                                           branch_scale, out_dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}" if self.activation != "none" else ""


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability ``p`` during
    training, scaling kept branches by ``1 / (1 - p)``. Identity in eval mode or when p = 0.

    The factors are drawn by :meth:`scale` and applied inside the fused residual add
    (:meth:`MultiwayLayerNorm.add`), so the module has no forward of its own."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B,) fp32 factors (0 or 1 / (1 - p)) for the branch ``x`` (B, ...), or None when
        the branch is kept whole."""
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        return x.new_empty(x.shape[0], dtype=torch.float32).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them: in -> hidden ... -> out."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_dim) -> (..., out_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x
