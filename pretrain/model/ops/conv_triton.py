"""Mamba2's causal depthwise conv + SiLU, forward and backward, as Triton kernels over the
projection's own layout: rows [b, l, d], channels contiguous.

Compiled, the reference's shifted products (`conv._conv_taps`) became six Inductor kernels per
layer (the padded input, the taps, and four in the backward) well below the H200's memory
bandwidth: 13.9 ms of the 1B hybrid_moe step (11 layers of [2, 8192, 4352] bf16). Here the forward
reads x once and writes y. The backward recomputes the pre-activation instead of saving it: one
kernel reads x and dy and writes the gradient before the SiLU, a second reads that and writes dx
(the shifted re-reads of a tile hit the cache): five passes in all. The first backward kernel also
sums the weight and bias gradients; a program walks 1024 positions and keeps the products in
registers, reducing over positions once at the end (per tile, the reductions had made it 2.5x
slower than the same kernel without them). docs/benchmarks.md, "Taps as a dimension", has the
measurements.

Each program owns a tile of positions x channels. An output at t sums taps at t - (w-1) .. t; with
document ids (`seq_idx`), a tap in another document than t's is dropped, as in the reference.
The weight and bias gradients are summed per program into fp32 partials, [programs over b and l,
d, w], and summed over programs by torch: deterministic, where atomics would not be.
`causal_conv1d_reference` (conv.py) is the oracle (tests/gpu/test_conv_kernel.py on CUDA,
tests/kernels in Triton's CPU interpreter).
"""

from __future__ import annotations

import torch
from torch import Tensor

# each kernel's tile: positions and channels per program, warps per program, and for the first
# backward kernel the positions one program walks (it sums the weight gradient over them in
# registers). The forward's and backward_pre's were the fastest of those timed alone on the H200;
# backward_input takes the forward's. benchmarks/conv_kernel.py --tiles times others.
TILES = {
    "forward": {"BLOCK_L": 32, "BLOCK_D": 128, "num_warps": 4},
    "backward_pre": {"BLOCK_L": 16, "BLOCK_D": 64, "num_warps": 4, "positions": 1024},
    "backward_input": {"BLOCK_L": 32, "BLOCK_D": 128, "num_warps": 4},
}


def _kernels():
    from pretrain.model.ops import conv_triton_kernels  # imports triton: only when a kernel runs

    return conv_triton_kernels


def _rows(t: Tensor) -> Tensor:
    """`t` [b, l, d] with contiguous channels (the kernels' only layout demand)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(name: str, x: Tensor, w: int) -> tuple[tuple[int, int, int], dict, int]:
    """Grid (channel blocks fastest), Triton meta-parameters and tiles per program along l of kernel
    `name` over x [b, l, d]. A program walks fewer tiles than its `positions` allow where the grid
    would otherwise give an SM fewer than two programs (short sequences, small batches)."""
    b, l, d = x.shape
    tile = dict(TILES[name])
    tiles_l, channel_blocks = -(-l // tile["BLOCK_L"]), -(-d // tile["BLOCK_D"])
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    walk = min(tile.pop("positions", tile["BLOCK_L"]) // tile["BLOCK_L"], channel_blocks * tiles_l * b // (2 * sms))
    steps = max(1, min(walk, tiles_l))
    grid = channel_blocks, -(-tiles_l // steps), b
    from triton import next_power_of_2

    return grid, {**tile, "W": w, "W_P2": next_power_of_2(w)}, steps  # taps padded to a power of two


def conv_silu_triton(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None) -> Tensor:
    """SiLU(causal depthwise conv(x)) for x [b, l, d] (rows of channels; any row stride), weight
    [d, w], bias [d], seq_idx [b, l] int32 document ids or None; no carried-in state. Returns
    [b, l, d] contiguous in x's dtype; `causal_conv1d_reference` on x.transpose(1, 2), transposed."""
    x = _rows(x)
    b, l, d = x.shape
    assert weight.shape[0] == d and (bias is None or bias.shape == (d,)), "one weight row and bias per channel"
    y = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    grid, meta, _ = _launch("forward", x, weight.shape[1])
    _kernels().conv_silu_forward[grid](
        x, x.stride(0), x.stride(1), weight.contiguous(), bias if bias is not None else x,
        seq_idx.contiguous() if seq_idx is not None else x, y, l, d, HAS_BIAS=bias is not None,
        HAS_DOC=seq_idx is not None, **meta)
    return y


def conv_silu_backward_triton(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                              seq_idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of `conv_silu_triton` (x, weight, bias or None) in their inputs' dtypes: the
    gradient before the SiLU (with the weight and bias sums), then the conv transposed."""
    x, dy = _rows(x), _rows(dy)
    b, l, d = x.shape
    w = weight.shape[1]
    weight = weight.contiguous()
    docs = seq_idx.contiguous() if seq_idx is not None else x
    grid, meta, steps = _launch("backward_pre", x, w)
    dpre = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
    dw = torch.empty(grid[1] * b, d, w, device=x.device, dtype=torch.float32)
    db = torch.empty(grid[1] * b, d, device=x.device, dtype=torch.float32) if bias is not None else None
    kernels = _kernels()
    kernels.conv_silu_backward_pre[grid](
        x, x.stride(0), x.stride(1), weight, bias if bias is not None else x, docs, dy, dy.stride(0), dy.stride(1),
        dpre, dw, db if db is not None else dw, l, d, steps, HAS_BIAS=bias is not None, HAS_DOC=seq_idx is not None,
        **meta)
    dx = torch.empty_like(dpre)
    grid, meta, _ = _launch("backward_input", x, w)
    kernels.conv_backward_input[grid](dpre, weight, docs, dx, l, d, HAS_DOC=seq_idx is not None, **meta)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype) if db is not None else None
