"""Rotary position embedding with Llama 3 frequency scaling (rotate-half layout, as in HF Llama)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from pretrain.model.config import RopeConfig
from pretrain.model.ops.precision import wide


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, cfg: RopeConfig, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies (cached per head size, config and device); Llama 3 scaling divides low
    frequencies by `factor` and blends the band between the low- and high-frequency wavelengths."""
    inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if cfg.factor is None:
        return inv_freq.float().to(device)
    low_wavelen = cfg.original_context / cfg.low_freq_factor
    high_wavelen = cfg.original_context / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (cfg.original_context / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * inv_freq / cfg.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_mid, blended, scaled).float().to(device)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin [l, d] for positions [l]; [b, 1, l, d] (per row, broadcast over heads) for [b, l]."""
    freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq
    if positions.dim() == 2:
        freqs = freqs[:, None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, h, l, d]; cos/sin [l, d] or [b, 1, l, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (wide(x) * cos + wide(rotated) * sin).type_as(x)
