"""A reduced-precision (bf16 / fp16 / int8) forward of `ImageEncoderViT`, beside the exact fp32 module.

Why a second forward instead of `encoder.to(torch.bfloat16)` or `torch.autocast`: on CPU both spend most of
their time in layout copies (batched products on permuted views, einsum, the adapter's unfold/fold), and end
slower than fp32. This forward holds the weights once in the low precision, already transposed into the
layout the products take, feeds contiguous tensors to every product, runs the windows of a windowed block
as one batch, writes attention as two batched products around an fp32 softmax (the relative-position bias
folded into the first one; `scaled_dot_product_attention` with a bias measured slower here) and the
adapter's convolutions as plain products on shifted views. On CUDA the attention is one fused
`scaled_dot_product_attention` call with the bias as an additive mask instead (the memory-efficient kernel
takes one; the folded products are a CPU layout trick). The residual stream, the layer norms, the
relative-position terms, the adapter's channel gate and the transposed convolution's scatter-add stay in fp32
(cheap, and where bf16 rounding would accumulate). The fp32 module is untouched: it stays the parity path.

int8 (`torch.qint8`) is the same forward in fp32 except its heavy products: qkv, the output projection, the
MLP and the adapter's two convolutions run as dynamic int8 products (`int8_linear.Int8Linear`). Their
quantized weights can come from a cache (`int8_weights`, by name); `int8_weights` after the preparation
holds every one used, and `int8_quantized_here` says whether any had to be quantized anew (then the caller
may save them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .image_encoder import ImageEncoderViT, relative_position_table
from .int8_linear import Int8Linear, QuantizedWeight, quantize

#: A heavy product's weight: an (in × out) matrix in the compute dtype, or an int8 product.
Weight = torch.Tensor | Int8Linear


class _Int8Weights:
    """The int8 weights by name: the known (cached) copy where it fits the weight, else quantized here."""

    def __init__(self, known: Mapping[str, QuantizedWeight] | None) -> None:
        self.known = dict(known or {})
        self.used: dict[str, QuantizedWeight] = {}
        self.quantized_here = False

    def product(self, name: str, rows: torch.Tensor) -> Int8Linear:
        """The int8 product named `name` of the (out × in) matrix whose row i is `rows[i]` flattened (a view:
        a conv's matrix is a reordered copy, made only where no kept copy fits). A kept copy must also hold,
        in its first and last rows, exactly what quantizing those rows gives now: one kept before a change
        of layout or quantizer, or damaged there, is not used."""
        shape = (rows.shape[0], rows[0].numel())
        quantized = self.known.get(name)
        if quantized is None or not quantized.matches(shape) or not _rows_agree(quantized, rows):
            quantized = quantize(rows.reshape(shape))
            self.quantized_here = True
        self.used[name] = quantized
        return Int8Linear(quantized)


def _rows_agree(quantized: QuantizedWeight, rows: torch.Tensor) -> bool:
    last = quantized.values.shape[0] - 1
    fresh = quantize(torch.stack([rows[0].reshape(-1), rows[last].reshape(-1)]))  # as in the whole matrix
    return torch.equal(fresh.values, quantized.values[[0, last]]) and torch.equal(
        fresh.scales, quantized.scales[[0, last]]
    )


def _t(weight: torch.Tensor, dtype: torch.dtype, int8: tuple[_Int8Weights, str] | None = None) -> Weight:
    """A Linear weight (out × in) as a contiguous (in × out) matrix in `dtype`, or (qint8) as the int8
    product `int8` names."""
    if dtype == torch.qint8:
        assert int8 is not None
        store, name = int8
        return store.product(name, weight.detach())
    return weight.detach().t().contiguous().to(dtype)


def _product(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight + bias, in whichever form `_t` gave the weight."""
    if isinstance(weight, Int8Linear):
        return weight(x, bias)
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


@dataclass
class _BlockWeights:
    window: int
    heads: int
    norm1: tuple[torch.Tensor, torch.Tensor]
    qkv_w: Weight
    qkv_b: torch.Tensor
    rel_h: torch.Tensor  # fp32, (size, size, head_dim) for the block's attention grid
    rel_w: torch.Tensor
    proj_w: Weight
    proj_b: torch.Tensor
    norm2: tuple[torch.Tensor, torch.Tensor]
    lin1_w: Weight
    lin1_b: torch.Tensor
    lin2_w: Weight
    lin2_b: torch.Tensor
    adapter: dict[str, Weight] | None
    adapter_eps: float = 1e-5


class LowPrecisionEncoder:
    """Callable B×3×S×S float32 image → B×C×S/16×S/16 embedding (float32 values from the final norm).

    `dtype` is bfloat16 or float16 (every product in it), or qint8 (heavy products in int8, the rest fp32).
    """

    def __init__(
        self,
        encoder: ImageEncoderViT,
        dtype: torch.dtype,
        fused_attention: bool | None = None,
        cancelled: threading.Event | None = None,
        int8_weights: Mapping[str, QuantizedWeight] | None = None,
    ) -> None:
        """`fused_attention`: None chooses by device (fused on CUDA); True/False forces one formulation
        (tests run the fused one on the CPU). float32 is accepted to check a formulation against the
        module at fp32 speed and accuracy; the predictor runs fp32 through the module itself.
        `cancelled`, once set, stops the preparation between blocks with `PreparationCancelled`.
        `int8_weights`: quantized weights kept from an earlier preparation (qint8 only; see the module)."""
        if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.qint8):
            raise ValueError(f"low-precision encoder needs bfloat16, float16, float32 or qint8, got {dtype}")
        self.products = dtype  # the heavy products' format
        self.dtype = torch.float32 if dtype == torch.qint8 else dtype  # everything else's
        self.fused_attention = fused_attention
        self.img_size = encoder.img_size
        dtype = self.dtype
        products = self.products
        int8 = _Int8Weights(int8_weights if products == torch.qint8 else None)
        with torch.no_grad():
            proj = encoder.patch_embed.proj
            self.patch = proj.kernel_size[0]
            self.patch_w = proj.weight.detach().reshape(proj.weight.shape[0], -1).t().contiguous().to(dtype)
            self.patch_b = proj.bias.detach().float()
            self.pos_embed = encoder.pos_embed.detach().float()
            grid = encoder.img_size // self.patch

            def block_weights(numbered: tuple[int, Any]) -> _BlockWeights:
                if cancelled is not None and cancelled.is_set():
                    raise PreparationCancelled("the low-precision weights are no longer wanted")
                index, block = numbered
                return self._block(block, dtype, (int8, f"blocks.{index}."), block.window_size or grid)

            if products == torch.qint8:  # CPU only; quantizing and packing is worth the threads
                self.blocks = _in_parallel(block_weights, enumerate(encoder.blocks))
            else:  # casts are quick, and some devices (MPS) abort on work from several threads
                self.blocks = [block_weights(numbered) for numbered in enumerate(encoder.blocks)]
            neck = encoder.neck
            self.neck1_w = neck[0].weight.detach()[:, :, 0, 0].t().contiguous().to(dtype)
            self.neck_norm1 = (neck[1].weight.detach().float(), neck[1].bias.detach().float(), neck[1].eps)
            self.neck2_w = _taps_matrix(neck[2].weight.detach(), dtype)
            self.neck_norm2 = (neck[3].weight.detach().float(), neck[3].bias.detach().float(), neck[3].eps)
        self.int8_weights = int8.used
        self.int8_quantized_here = int8.quantized_here

    def _block(self, block, dtype: torch.dtype, int8: tuple[_Int8Weights, str], size: int) -> _BlockWeights:
        """The block's weights; `int8` names its int8 products (the store and the block's prefix); `size`
        is the side of the grid its attention sees (window or whole)."""
        products = self.products
        store, prefix = int8

        def named(name: str) -> tuple[_Int8Weights, str]:
            return store, prefix + name

        attn = block.attn
        adapter = None
        if block.Adapter is not None:
            a = block.Adapter
            conv, deconv = a.spatial[0].weight.detach(), a.spatial[2].weight.detach()
            adapter = {
                "gate1": a.channel[0].weight.detach().t().contiguous().float(),
                "gate2": a.channel[2].weight.detach().t().contiguous().float(),
                "down": _taps_matrix(conv, products, named("adapter.down")),
                "up": _up_taps(deconv, products, named("adapter.up")),
                "norm_w": a.norm.weight.detach().float(),
                "norm_b": a.norm.bias.detach().float(),
            }
        return _BlockWeights(
            window=block.window_size,
            heads=attn.num_heads,
            norm1=(block.norm1.weight.detach().float(), block.norm1.bias.detach().float()),
            qkv_w=_t(attn.qkv.weight, products, named("attn.qkv")),
            qkv_b=attn.qkv.bias.detach().to(dtype),
            rel_h=relative_position_table(size, attn.rel_pos_h.detach().float()),
            rel_w=relative_position_table(size, attn.rel_pos_w.detach().float()),
            proj_w=_t(attn.proj.weight, products, named("attn.proj")),
            proj_b=attn.proj.bias.detach().to(dtype),
            norm2=(block.norm2.weight.detach().float(), block.norm2.bias.detach().float()),
            lin1_w=_t(block.mlp.lin1.weight, products, named("mlp.lin1")),
            lin1_b=block.mlp.lin1.bias.detach().to(dtype),
            lin2_w=_t(block.mlp.lin2.weight, products, named("mlp.lin2")),
            lin2_b=block.mlp.lin2.bias.detach().to(dtype),
            adapter=adapter,
            adapter_eps=block.Adapter.norm.eps if block.Adapter is not None else 1e-5,
        )

    def to(self, device: torch.device | str) -> LowPrecisionEncoder:
        """Move every weight to `device` (in place). int8 products exist on the CPU only."""
        if self.products == torch.qint8 and torch.device(device).type != "cpu":
            raise ValueError("int8 products run on the CPU only")
        for holder in (self, *self.blocks):
            for name, value in vars(holder).items():
                setattr(holder, name, _moved(value, device))
        return self

    def uses_fused_attention(self, device: torch.device) -> bool:
        """Fused attention (SDPA with the bias as a mask) on CUDA; the two folded products elsewhere, where
        they measured faster (CPU)."""
        if self.fused_attention is not None:
            return self.fused_attention
        return torch.device(device).type == "cuda"

    # -- forward ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        dt = self.dtype
        batch, channels, height, width = image.shape
        p = self.patch
        gh, gw = height // p, width // p
        patches = image.reshape(batch, channels, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch * gh * gw, channels * p * p).to(dt)
        x = (patches @ self.patch_w).float() + self.patch_b
        x = x.reshape(batch, gh, gw, -1) + self.pos_embed  # fp32 residual stream, B×H×W×C
        for block in self.blocks:
            x = self._forward_block(block, x)
        y = x.reshape(-1, x.shape[-1]).to(dt) @ self.neck1_w
        y = _layer_norm(y.float(), *self.neck_norm1).reshape(batch, gh, gw, -1)
        y = (_patches3x3(y.to(dt), stride=1) @ self.neck2_w).float()
        y = _layer_norm(y, *self.neck_norm2)
        return y.reshape(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous()

    def _forward_block(self, w: _BlockWeights, x: torch.Tensor) -> torch.Tensor:
        dt = self.dtype
        batch, height, width, dim = x.shape
        tokens = batch * height * width
        n = F.layer_norm(x, (dim,), *w.norm1, eps=1e-6).reshape(tokens, dim).to(dt)
        qkv = _product(n, w.qkv_w, w.qkv_b).reshape(batch, height, width, 3 * dim)
        if w.window > 0:
            attended = self._windowed(w, qkv)
        else:
            attended = self._attend(w, qkv)
        x = x + _product(attended.reshape(tokens, dim), w.proj_w, w.proj_b).float().reshape(x.shape)
        n32 = F.layer_norm(x, (dim,), *w.norm2, eps=1e-6)
        n = n32.reshape(tokens, dim).to(dt)
        hidden = F.gelu(_product(n, w.lin1_w, w.lin1_b))
        x = x + _product(hidden, w.lin2_w, w.lin2_b).float().reshape(x.shape)
        if w.adapter is not None:
            x = x + self._adapter(w.adapter, n32, w.adapter_eps)
        return x

    def _adapter(self, a: dict[str, Weight], n: torch.Tensor, eps: float) -> torch.Tensor:
        """The SAM-Med2D adapter on the fp32 norm2 output n (B×H×W×C); see `image_encoder.Adapter`."""
        batch, height, width, dim = n.shape
        gate = torch.sigmoid(F.relu(n.mean(dim=(1, 2)) @ a["gate1"]) @ a["gate2"])
        gated = (gate[:, None, None, :] * n).to(self.dtype)
        down = F.relu(_product(_patches3x3(gated, stride=2), a["down"]))  # B·(H/2·W/2) × C
        dh, dw = (height + 1) // 2, (width + 1) // 2
        if isinstance(a["up"], Int8Linear):  # rows (C_out, ky, kx), see `_up_taps`
            taps = a["up"](down).reshape(batch, dh, dw, dim, 4, 4).permute(0, 4, 5, 3, 1, 2)
        else:
            # Weight on the left: for these shapes (few pixels, many taps) the product is ~1.5× faster so.
            taps = a["up"] @ down.t()  # one product for the whole batch
            taps = taps.reshape(4, 4, dim, batch, dh, dw).permute(3, 0, 1, 2, 4, 5)
        up = F.relu(_transposed_4x4_s2(taps, height, width))
        return F.layer_norm(n + up, (dim,), a["norm_w"], a["norm_b"], eps=eps)

    def _attend(
        self, w: _BlockWeights, qkv: torch.Tensor, rows: int | None = None, cols: int | None = None
    ) -> torch.Tensor:
        """Attention on a B×S×S grid of q/k/v (B×S×S×3C) → B×rows×cols×C: only the queries of the top-left
        rows×cols sub-grid are computed (in a zero-padded window the others are cropped away anyway)."""
        batch, size, _, three_c = qkv.shape
        rows = size if rows is None else rows
        cols = size if cols is None else cols
        heads = w.heads
        head_dim = three_c // (3 * heads)
        tokens = size * size
        qkv = qkv.reshape(batch, size, size, 3, heads, head_dim)
        q = qkv[:, :rows, :cols, 0].permute(0, 3, 1, 2, 4)  # B, heads, rows, cols, d
        k, v = qkv.reshape(batch, tokens, 3, heads, head_dim)[:, :, 1:].permute(2, 0, 3, 1, 4).contiguous()
        # Decomposed relative positions from the unscaled q, in fp32 (tiny products, they make the bias).
        qf = q.float()
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", qf, w.rel_h[:rows])
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", qf, w.rel_w[:cols])
        attend = _fused_attention if self.uses_fused_attention(qkv.device) else _folded_attention
        out = attend(q, k, v, rel_h, rel_w)  # B × heads × queries × d
        return out.transpose(1, 2).reshape(batch, rows, cols, heads * head_dim)

    def _windowed(self, w: _BlockWeights, qkv: torch.Tensor) -> torch.Tensor:
        """Zero-padded windows: a padding token is zero after norm1, so its q/k/v are the qkv bias (the
        official formulation); only the real tokens' queries are computed."""
        batch, height, width, three_c = qkv.shape
        ws = w.window
        hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
        if (hp, wp) != (height, width):
            padded = w.qkv_b.expand(batch, hp, wp, three_c).clone()
            padded[:, :height, :width] = qkv
            qkv = padded
        out = qkv.new_empty(batch, height, width, three_c // 3)
        for y in range(0, height, ws):
            for x in range(0, width, ws):
                rows, cols = min(ws, height - y), min(ws, width - x)
                window = qkv[:, y : y + ws, x : x + ws]
                out[:, y : y + rows, x : x + cols] = self._attend(w, window, rows, cols)
        return out


class PreparationCancelled(Exception):
    """The weights' preparation was stopped (`LowPrecisionEncoder`'s `cancelled`)."""


def _in_parallel(prepare: Callable[[Any], _BlockWeights], blocks: Iterable[Any]) -> list[_BlockWeights]:
    """The blocks' weights prepared by as many threads as torch uses: quantizing and packing int8 weights
    runs on one core per call and releases the GIL (5.3 s serial, 2.9 s on 2 threads for ViT-B). Grad
    mode is per thread: each call runs under its own no_grad."""
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        return list(pool.map(torch.no_grad()(prepare), blocks))


def _moved(value, device: torch.device | str):
    """`value` with its tensors (also inside a tuple or dict) on `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _folded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """q: B×heads×rows×cols×d; k, v: B×heads×S²×d; rel_h, rel_w: B×heads×rows×cols×S (fp32) → B×heads×
    rows·cols×d. The decomposed relative-position bias folded into one product: [q·scale, rel_h, rel_w]
    against [k, one-hot key row, one-hot key column] gives q·k·scale + rel_h[key row] + rel_w[key column],
    so the tokens² bias is never built (on CPU it cost more than the attention)."""
    batch, heads, rows, cols, head_dim = q.shape
    size, tokens, dt = rel_h.shape[-1], k.shape[2], q.dtype
    q_aug = torch.cat([q * head_dim**-0.5, rel_h.to(dt), rel_w.to(dt)], dim=-1)
    k_aug = torch.cat([k, _key_positions(size, dt, q.device).expand(batch, heads, tokens, 2 * size)], dim=-1)
    n, d = batch * heads, q_aug.shape[-1]
    scores = torch.bmm(q_aug.reshape(n, rows * cols, d), k_aug.reshape(n, tokens, d).transpose(1, 2))
    # Softmax on the bf16 scores: the CPU kernel keeps its max and sum in fp32, and an fp32 copy of the
    # scores cost as much as the products.
    probs = torch.softmax(scores, -1)
    return torch.bmm(probs, v.reshape(n, tokens, head_dim)).reshape(batch, heads, rows * cols, head_dim)


#: The memory-efficient CUDA kernel wants the mask's rows aligned to this many elements (else torch copies
#: the mask into an aligned one and warns).
_MASK_ALIGN = 16


def _fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """The same attention as `_folded_attention` as one `scaled_dot_product_attention` call, the bias
    (summed in fp32, stored in the compute dtype) as its B×heads×queries×keys additive mask."""
    batch, heads, rows, cols, head_dim = q.shape
    size, tokens = rel_h.shape[-1], k.shape[2]
    padded = -(-tokens // _MASK_ALIGN) * _MASK_ALIGN
    mask = q.new_empty(batch, heads, rows * cols, padded)[..., :tokens]
    mask.view(batch, heads, rows, cols, size, size).copy_(rel_h[..., :, None] + rel_w[..., None, :])
    query = q.reshape(batch, heads, rows * cols, head_dim)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=head_dim**-0.5)


_KEY_POSITIONS: dict[tuple, torch.Tensor] = {}


def _key_positions(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size² × 2·size): each key token's row and column as one-hot vectors (cached per grid size)."""
    key = (size, dtype, device)
    if key not in _KEY_POSITIONS:
        index = torch.arange(size * size, device=device)
        eye = torch.eye(size, dtype=dtype, device=device)
        _KEY_POSITIONS[key] = torch.cat([eye[index // size], eye[index % size]], dim=-1)
    return _KEY_POSITIONS[key]


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=eps)


def _taps_matrix(
    weight: torch.Tensor, dtype: torch.dtype, int8: tuple[_Int8Weights, str] | None = None
) -> Weight:
    """Conv weight (C_out × C_in × 3 × 3) → (9·C_in × C_out), rows in the (ky, kx, C_in) order of
    `_patches3x3` (or that product in int8)."""
    rows = weight.detach().permute(0, 2, 3, 1)  # C_out × ky × kx × C_in, a view
    if dtype == torch.qint8:
        assert int8 is not None
        store, name = int8
        return store.product(name, rows)
    return _t(rows.reshape(weight.shape[0], -1), dtype)


def _up_taps(
    deconv: torch.Tensor, dtype: torch.dtype, int8: tuple[_Int8Weights, str] | None = None
) -> Weight:
    """The transposed convolution's weight (C_in × C_out × 4 × 4) as one product giving every tap's
    contribution, added into place by `_transposed_4x4_s2`: a (ky·kx·C_out × C_in) matrix for the left of
    the product in `dtype`, or in int8 the product x @ Mᵀ with M's rows in (C_out, ky, kx) order, a plain
    transpose of the stored weight (the 4-D permute took seconds of the int8 preparation)."""
    c_in, c_out = deconv.shape[:2]
    if dtype == torch.qint8:
        return _t(deconv.reshape(c_in, 16 * c_out).t(), dtype, int8)
    return deconv.permute(2, 3, 1, 0).reshape(16 * c_out, c_in).contiguous().to(dtype)


def _patches3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Channels-last 3×3 patches with padding 1: B×H×W×C → B·H'·W' × 9·C (for a conv as one product)."""
    batch, height, width, channels = x.shape
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    oh, ow = (height - 1) // stride + 1, (width - 1) // stride + 1
    views = [
        padded[:, ky : ky + stride * (oh - 1) + 1 : stride, kx : kx + stride * (ow - 1) + 1 : stride]
        for ky in range(3)
        for kx in range(3)
    ]
    return torch.cat(views, dim=-1).reshape(batch * oh * ow, 9 * channels)


# ConvTranspose2d(kernel 4, stride 2, padding 1): output row 2m takes kernel row 1 from input row m and kernel
# row 3 from input row m−1; output row 2m+1 takes kernel row 0 from input row m+1 and kernel row 2 from row m.
_PHASE_TAPS = (((0, 1), (-1, 3)), ((1, 0), (0, 2)))


def _transposed_4x4_s2(taps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-input-pixel tap contributions B×4×4×C×h×w → the transposed convolution's output (summed in fp32),
    as a channels-last B×H×W×C view. Each output phase starts from its unshifted tap and adds the shifted
    ones in place: no padded copy of the taps."""
    batch, _, _, channels, h, w = taps.shape
    out = torch.empty(batch, channels, h, 2, w, 2, dtype=torch.float32, device=taps.device)
    for a in range(2):
        for b in range(2):
            phase = out[:, :, :, a, :, b]
            for dy, ky in _PHASE_TAPS[a]:
                for dx, kx in _PHASE_TAPS[b]:
                    source = taps[:, ky, kx]
                    if dy == dx == 0:
                        phase.copy_(source)
            for dy, ky in _PHASE_TAPS[a]:
                for dx, kx in _PHASE_TAPS[b]:
                    if dy == dx == 0:
                        continue
                    # output pixel m takes input pixel m + d, where that exists
                    target = phase[:, :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
                    target += taps[:, ky, kx, :, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    return out.reshape(batch, channels, 2 * h, 2 * w)[:, :, :height, :width].permute(0, 2, 3, 1)
