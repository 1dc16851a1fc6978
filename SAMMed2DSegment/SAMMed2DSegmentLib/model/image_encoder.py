"""SAM-Med2D image encoder: ViT with windowed/global attention, decomposed relative positions and
the SAM-Med2D adapter beside the MLP of every block.

Written from the project's inference specification. Attribute names follow the official checkpoint so that
`sam-med2d_b.pth` loads strictly. Two exact shortcuts over the reference computation (same values, less work):
window padding tokens are all-zero after `norm1`, so their q/k/v equal the qkv bias and are not pushed
through the linear layers; and the output projection runs on real tokens only, after the windows are cropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


class PatchEmbed(nn.Module):
    """16×16 non-overlapping patches → channels-last tokens."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """Rows of `table` for every (query, key) pair along one axis: index q − k + size − 1.

    The released 256-pixel checkpoint has tables of exactly 2·size − 1 rows; other lengths are linearly
    resized as the official code does (only reachable with checkpoints made for other input sizes).
    """
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()
    coords = torch.arange(size, device=table.device)
    return table[coords[:, None] - coords[None, :] + size - 1]


class Attention(nn.Module):
    """Multi-head self-attention on a square grid with decomposed relative-position terms."""

    def __init__(self, dim: int, num_heads: int, grid_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim))
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
        """Attention on a B×S×S grid of projected q/k/v (B×S×S×3C) → B×rows×cols×C, before `proj`.

        Only the queries of the top-left rows×cols sub-grid are computed (all S×S tokens stay keys and
        values): in a zero-padded window the padding tokens' outputs are discarded anyway.
        """
        batch, size, _, three_c = qkv.shape
        rows = size if rows is None else rows
        cols = size if cols is None else cols
        heads = self.num_heads
        head_dim = three_c // (3 * heads)
        qkv = qkv.reshape(batch, size, size, 3, heads, head_dim)
        q = qkv[:, :rows, :cols, 0].permute(0, 3, 1, 2, 4)  # B, heads, rows, cols, d
        k, v = qkv.reshape(batch, size * size, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[1:]
        # Decomposed relative positions, computed with the unscaled q (as in the official model).
        rh = relative_position_table(size, self.rel_pos_h)[:rows]
        rw = relative_position_table(size, self.rel_pos_w)[:cols]
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, rw)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, rows * cols, size * size)
        q = q.reshape(batch, heads, rows * cols, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.transpose(1, 2).reshape(batch, rows, cols, heads * head_dim)


class Adapter(nn.Module):
    """SAM-Med2D adapter: channel gate, then a strided conv / transposed conv, skip, own LayerNorm (eps 1e-5).

    It runs beside the MLP on the same `norm2` output, over the whole token grid (never windowed).
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)  # default eps 1e-5, unlike the block norms
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×H×W×C (channels-last, as the blocks keep it)."""
        gate = self.channel(x.mean(dim=(1, 2)))
        down = F.relu(_conv3x3_s2(gate[:, None, None, :] * x, self.spatial[0].weight))
        up = F.relu(_conv_transpose4x4_s2(down, self.spatial[2].weight))
        return self.norm(x + up)


# The adapter's convolutions are written as single matrix products on channels-last tokens: on CPU the
# library convolutions reach a fraction of matmul speed for these shapes (768 channels on a 16×16 grid),
# and they took half of the encoder's time. Same arithmetic, summed in a different order.


def _conv3x3_s2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Conv2d(kernel 3, stride 2, padding 1, no bias) on B×H×W×C → B×H/2×W/2×C_out."""
    batch, height, width, _ = x.shape
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=3, padding=1, stride=2)  # B × C·9 × L
    out = weight.reshape(weight.shape[0], -1) @ cols  # B × C_out × L
    return out.transpose(1, 2).reshape(batch, (height + 1) // 2, (width + 1) // 2, -1)


def _conv_transpose4x4_s2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d(kernel 4, stride 2, padding 1, no bias) on B×H×W×C → B×2H×2W×C_out.

    One product gives every (input pixel, output channel, kernel tap) contribution; `fold` then adds them
    into place, which is exactly the transposed convolution's scatter-add.
    """
    batch, height, width, channels = x.shape
    out_channels = weight.shape[1]
    # (C_out·16 × C) @ (C × H·W) per image: already the (channels·taps × positions) layout `fold` takes.
    cols = weight.reshape(channels, out_channels * 16).t() @ x.reshape(
        batch, height * width, channels
    ).transpose(1, 2)
    out = F.fold(cols, (2 * height, 2 * width), kernel_size=4, stride=2, padding=1)
    return out.permute(0, 2, 3, 1)


class Block(nn.Module):
    """Transformer block; `window_size` 0 means global attention."""

    def __init__(self, dim: int, num_heads: int, grid_size: int, window_size: int, adapter: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window_size if window_size > 0 else grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, dim * 4, nn.GELU)
        self.Adapter = Adapter(dim) if adapter else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.attn.qkv(self.norm1(x))
        if self.window_size > 0:
            attended = self._windowed(qkv)
        else:
            attended = self.attn.attend(qkv)
        x = x + self.attn.proj(attended)
        n = self.norm2(x)
        if self.Adapter is None:
            return x + self.mlp(n)
        return x + self.mlp(n) + self.Adapter(n)

    def _windowed(self, qkv: torch.Tensor) -> torch.Tensor:
        """Zero-padded windows without an attention mask: padding tokens take part as keys and values.

        After `norm1` a padding token is all zeros, so its q/k/v are exactly the qkv bias.
        """
        batch, height, width, channels = qkv.shape
        ws = self.window_size
        hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
        if (hp, wp) != (height, width):
            padded = self.attn.qkv.bias.to(qkv.dtype).expand(batch, hp, wp, channels).clone()
            padded[:, :height, :width] = qkv
            qkv = padded
        out = qkv.new_empty(batch, height, width, channels // 3)
        for y in range(0, height, ws):
            for x in range(0, width, ws):
                rows, cols = min(ws, height - y), min(ws, width - x)
                window = qkv[:, y : y + ws, x : x + ws]
                out[:, y : y + rows, x : x + cols] = self.attn.attend(window, rows, cols)
        return out


class ImageEncoderViT(nn.Module):
    """ViT image encoder: patch embedding, absolute positions, blocks, conv neck → B×256×16×16."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        window_size: int = 14,
        out_chans: int = 256,
        adapter: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, grid, 0 if i in global_attn_indexes else window_size, adapter)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
