"""Sliding-window attention with sinks on FlexAttention's block-sparse kernel (CUDA).

SDPA takes a window only as a dense [l, l] mask, which sends it to its slow math / efficient path
(SWA ran at 0.76x llama on the H200). FlexAttention skips the key blocks outside the window and the
sinks altogether, so a window costs about window/l of global attention. Training shape only (no
cache: queries and keys are the same positions 0..l-1); the mask rule is attention_mask's.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def _window_mask_mod(window: int, n_sink: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < n_sink))
    return mask_mod


@functools.lru_cache(maxsize=16)
def window_block_mask(length: int, window: int, n_sink: int, device: torch.device):
    """The block mask of one (length, window, sinks), built once and reused by every layer/step."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_window_mask_mod(window, n_sink), None, None, length, length, device=device)


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, n_sink: int,
                             compiled: bool = True) -> Tensor:
    """q [b,h,l,d], k/v [b,kv,l,d] at positions 0..l-1 -> [b,h,l,dv]; `compiled` False runs
    flex_attention's eager reference (CPU tests of the mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    from pretrain.model.ops.attention import _compiled_flex, flex_kernel_options  # the document path's

    mask = window_block_mask(q.shape[2], window, n_sink, q.device)
    # inside a compiled block dynamo captures flex_attention itself and Inductor makes the kernel
    fn = _compiled_flex()[0] if compiled and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1],
              kernel_options=flex_kernel_options(q.shape[-1], v.shape[-1], q.dtype))
