"""SSD scan (Mamba2's state-space dual): chunked reference + mamba-ssm Triton dispatch.

Recurrence per head h (state [P, N]):  S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t.
The reference follows mamba-ssm's `ssd_minimal_discrete`, extended to any length (padding with
dt = 0 leaves the state untouched), ngroups >= 1, an initial state and per-token document ids
(`seq_idx` [b, l], mamba-ssm's argument): the state resets at each document start, i.e. a token
sees only inputs of its own document (the initial state belongs to the first token's document).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.library import has_mamba_ssd
from pretrain.model.ops.precision import wide_dtype


def segsum(x: Tensor) -> Tensor:
    """out[..., i, j] = sum(x[..., j+1:i+1]) for j <= i, -inf above the diagonal (stable form)."""
    t = x.size(-1)
    x = x[..., None].expand(*x.shape, t)
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~lower, 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device)), -torch.inf)


def ssd_scan_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                       initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [b,l,h,p], dt [b,l,h] (positive), A [h] (negative), B/C [b,l,g,n], state [b,h,p,n].

    Returns y [b,l,h,p] (x's dtype) and the final state [b,h,p,n] (fp32 or fp64). Half-precision
    inputs are computed in fp32, as the Triton kernel accumulates.
    """
    out_dtype = x.dtype
    work = wide_dtype(x.dtype)
    x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    pad = (-l) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (l + pad) // chunk_size
    B = B.repeat_interleave(h // g, dim=2).reshape(b, c, chunk_size, h, n)
    C = C.repeat_interleave(h // g, dim=2).reshape(b, c, chunk_size, h, n)
    X = (x * dt[..., None]).reshape(b, c, chunk_size, h, p)
    A_dt = (dt * A).reshape(b, c, chunk_size, h).permute(0, 3, 1, 2)  # [b,h,c,q]
    A_cum = torch.cumsum(A_dt, dim=-1)

    # 1. within-chunk outputs (the quadratic, attention-like part)
    decay = torch.exp(segsum(A_dt))
    if seq_idx is not None:  # documents: every decay between two documents is zero
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1).reshape(b, 1, c, chunk_size)
        state_doc = torch.cat([seq[..., 0, :1], seq[..., -1]], dim=-1)  # initial state, end of each chunk
        decay = decay * (seq[..., :, None] == seq[..., None, :])
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, X)
    # 2. state at the end of each chunk, from that chunk's inputs alone
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (seq == seq[..., -1:])
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, X)
    # 3. carry states across chunks (a scan over c, done as a c x c matrix)
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device)
    states = torch.cat([initial_state[:, None].to(work), states], dim=1)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))
    if seq_idx is not None:
        chunk_decay = chunk_decay * (state_doc[..., :, None] == state_doc[..., None, :])
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]
    # 4. contribution of the carried-in state to each position
    carried = torch.exp(A_cum)
    if seq_idx is not None:
        carried = carried * (seq == state_doc[..., :-1, None])
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, carried)
    y = (y_diag + y_off).reshape(b, c * chunk_size, h, p)[:, :l]
    return y.to(out_dtype), final_state


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             state: Tensor | None) -> tuple[Tensor, Tensor]:
    """One step of the recurrence in PyTorch (a one-token prompt, and decoding off CUDA through
    `mamba2_step_reference`; on CUDA `mamba2_step` fuses it with the conv); returns a new state
    (fp32 or fp64)."""
    b, _, h, p = x.shape
    work = wide_dtype(x.dtype)
    rep = h // B.shape[2]
    Bh = B[:, 0].repeat_interleave(rep, dim=1).to(work)  # [b,h,n]
    Ch = C[:, 0].repeat_interleave(rep, dim=1).to(work)
    dt0 = dt[:, 0].to(work)  # [b,h]
    if state is None:
        state = x.new_zeros(b, h, p, B.shape[-1], dtype=work)
    # decay, then the rank-1 input as a batched GEMM accumulated in place: two passes over the state
    state = state.to(work) * torch.exp(dt0 * A.to(work))[..., None, None]
    dt_x = (dt0[..., None] * x[:, 0].to(work)).reshape(b * h, p, 1)
    state.view(b * h, p, -1).baddbmm_(dt_x, Bh.reshape(b * h, 1, -1))
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    return y[:, None].to(x.dtype), state


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatching SSD scan: mamba-ssm's Triton kernel (a custom op, see library.py) on CUDA when
    installed, else the reference; a single step (decoding, within the state's document) runs the
    recurrence directly."""
    if x.shape[1] == 1:
        return ssd_step(x, dt, A, B, C, initial_state)
    if not (wants_fast_kernel(x) and has_mamba_ssd()):
        return ssd_scan_reference(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
    if seq_idx is not None:  # int32, counted from 0: the kernel gives the initial state to sequence 0
        seq_idx = (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
    return torch.ops.pretrain.ssd_scan(x, dt, A, B, C, chunk_size, initial_state, seq_idx)


def reference_scan_warning(device: torch.device, blocks: Iterable[str]) -> str | None:
    """A start-up warning where a model's SSD scans (Mamba2 "M" and intra-hybrid "H" blocks) would
    run on CUDA without mamba-ssm: `ssd_scan` then falls back to the reference, which holds
    chunk x chunk decays per head (slower, more memory), and which torch 2.11's Inductor failed to
    compile on CUDA (its cumsum's SplitScan codegen, seen on the H200). None where nothing is missing."""
    if device.type != "cuda" or not {"M", "H"} & set(blocks) or has_mamba_ssd():
        return None
    return ("mamba-ssm is not installed: the Mamba2 scans run the PyTorch reference on cuda (slower, more memory; "
            "torch 2.11's Inductor failed to compile it there); install the gpu extra: pip install -e '.[gpu]'")
