"""Small building blocks shared by the encoder and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def standard_normal(*shape: int) -> torch.Tensor:
    """N(0, 1) values, as `torch.randn`, except on the meta device, where `load_model` builds the network
    only for its shapes: there torch's random fills import `torch._dynamo` and sympy, which was over 2 s of
    every engine start. The values are drawn exactly as `torch.randn` draws them."""
    tensor = torch.empty(*shape)
    return tensor if tensor.is_meta else tensor.normal_()


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """`nn.Embedding` with its N(0, 1) initial weights drawn by `standard_normal`."""
    weight = standard_normal(num_embeddings, embedding_dim)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an N×C×H×W tensor (biased variance, per-channel affine)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (`lin1`, `lin2` as in the checkpoint)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (hypernetworks and the IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return x
