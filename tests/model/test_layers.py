"""The small layers against their plain definitions."""

import torch
import torch.nn.functional as F

from oneref.model.layers import MLP, DropPath, MultiwayLayerNorm, MultiwayLinear


def test_multiway_layer_norm_is_two_layer_norms():
    norm = MultiwayLayerNorm(8)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(2, 7, 8)
    expected = torch.cat([norm.A(x[:, :3]), norm.B(x[:, 3:])], dim=1)
    torch.testing.assert_close(norm(x, 3), expected)


def test_multiway_linear_is_two_linears_with_optional_gelu():
    lin = MultiwayLinear(8, 5, activation="gelu")
    x = torch.randn(2, 7, 8)
    expected = F.gelu(torch.cat([lin.A(x[:, :4]), lin.B(x[:, 4:])], dim=1))
    torch.testing.assert_close(lin(x, 4), expected)


def test_drop_path_train_and_eval():
    drop = DropPath(0.5)
    x = torch.ones(1000, 3)
    drop.train()
    scale = drop.scale(x)
    assert scale.shape == (1000,) and scale.dtype == torch.float32
    kept = scale != 0
    assert torch.all(scale[kept] == 2.0)
    assert 400 < int(kept.sum()) < 600  # per-sample Bernoulli(0.5)
    drop.eval()
    assert drop.scale(x) is None
    assert DropPath(0.0).train().scale(x) is None


def test_multiway_layer_norm_fuses_gelu_and_the_residual_add():
    norm = MultiwayLayerNorm(8, activation="gelu")
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x, branch = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    expected = torch.cat([norm.A(F.gelu(x[:, :3])), norm.B(F.gelu(x[:, 3:]))], dim=1)
    torch.testing.assert_close(norm(x, 3), expected)
    scale = torch.tensor([0.0, 2.0])
    h, y = MultiwayLayerNorm(8).add(x, branch, 3, scale)
    torch.testing.assert_close(h, x + branch * scale[:, None, None])


def test_mlp_relu_between_layers():
    mlp = MLP(3, 4, 2, 3)
    x = torch.randn(5, 3)
    h = F.relu(mlp.layers[1](F.relu(mlp.layers[0](x))))
    torch.testing.assert_close(mlp(x), mlp.layers[2](h))
