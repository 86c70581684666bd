"""Hybrid Transformer / Mamba2 (/ MoE) causal LM for transformers, exported by the `pretrain` stack.

Standalone (torch + transformers only): it is copied next to the weights and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It mirrors the training
stack's pure-PyTorch reference path (module and parameter names included, so the weights map
one to one); the stack's tests compare its logits and greedy generations with the original.

Blocks (`config.blocks`): 'A' global attention, 'S' sliding-window attention with sinks, 'M'
Mamba2, 'H' intra-layer hybrid; each block is x + mixer(norm(x)), then x + ffn(norm(x)), the FFN a
SwiGLU or a mixture of experts (shared + sigmoid-routed top-k). `generate` keeps a `HybridCache`
(KV per attention layer, conv + SSM state per Mamba2 layer); prompts must be unpadded.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_hybrid import HybridConfig


def wide(t: Tensor) -> Tensor:
    """fp32, or fp64 kept: norms, softmax, RoPE and the SSM's dt run at least in fp32."""
    return t if t.element_size() >= 8 else t.float()


# ---- normalisation -------------------------------------------------------------------------------
def group_rms_norm(x: Tensor, weight: Tensor, eps: float, n_groups: int = 1) -> Tensor:
    shape = x.shape
    x = wide(x).reshape(*shape[:-1], n_groups, shape[-1] // n_groups)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x.reshape(shape) * wide(weight)).type_as(weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, n_groups: int = 1):
        super().__init__()
        self.eps, self.n_groups = eps, n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return group_rms_norm(x, self.weight, self.eps, self.n_groups)


class GatedRMSNorm(RMSNorm):
    """Mamba2's output norm: group-local RMSNorm(y * SiLU(z))."""

    def forward(self, y: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        return group_rms_norm(wide(y) * F.silu(wide(z)), self.weight, self.eps, self.n_groups)


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head."""

    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.eps, self.head_width = eps, dim // n_heads
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = wide(x).reshape(-1, shape[-1] // self.head_width, self.head_width)
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps).reshape(shape)
        return (x * wide(self.weight) + wide(self.bias)).type_as(self.weight)


# ---- rotary embedding (Llama 3 frequency scaling) ------------------------------------------------
@functools.lru_cache(maxsize=16)
def rope_inv_freq(head_dim: int, theta: float, factor: float | None, low_freq_factor: float,
                  high_freq_factor: float, original_context: int) -> Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if factor is None:
        return inv_freq.float()
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_mid, blended, scaled).float()


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """x [b, h, l, d] rotated (rotate-half layout) at `positions` [l]."""
    freqs = positions.to(inv_freq.dtype)[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return (wide(x) * emb.cos() + wide(torch.cat([-x2, x1], dim=-1)) * emb.sin()).type_as(x)


# ---- attention -----------------------------------------------------------------------------------
class Attention(nn.Module):
    """Grouped-query attention; `window` set: sliding window plus the first `n_sink` positions.
    `project_out=False` returns the heads unprojected (the intra-hybrid mixer projects them)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, qk_head_dim: int, rope: dict,
                 v_head_dim: int | None = None, window: int | None = None, n_sink: int = 0,
                 project_out: bool = True):
        super().__init__()
        self.qk_head_dim, self.v_head_dim = qk_head_dim, v_head_dim or qk_head_dim
        self.window, self.n_sink = window, n_sink
        self.rope = (rope["theta"], rope.get("factor"), rope.get("low_freq_factor", 1.0),
                     rope.get("high_freq_factor", 4.0), rope.get("original_context", 8192))
        self.q_proj = nn.Linear(d_model, n_heads * qk_head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * qk_head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_head_dim, d_model, bias=False) if project_out else None

    def values(self, x: Tensor) -> Tensor:
        return self.v_proj(x).unflatten(-1, (-1, self.v_head_dim))

    def forward(self, x: Tensor, positions: Tensor, state: dict | None = None, v: Tensor | None = None) -> Tensor:
        b, l = x.shape[:2]
        q = self.q_proj(x).view(b, l, -1, self.qk_head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, -1, self.qk_head_dim).transpose(1, 2)
        v = (v if v is not None else self.values(x)).transpose(1, 2)
        inv_freq = rope_inv_freq(self.qk_head_dim, *self.rope)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_pos = positions
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
                k_pos = torch.cat([state["pos"], positions])
            keep = slice(None)
            if self.window is not None:  # later queries see only sinks + window: drop the rest
                keep = (k_pos < self.n_sink) | (k_pos > positions[-1] - self.window)
            state["k"], state["v"], state["pos"] = k[:, :, keep], v[:, :, keep], k_pos[keep]
        diff = positions[:, None] - k_pos[None, :]
        mask = diff >= 0
        if self.window is not None:
            mask &= (diff < self.window) | (k_pos[None, :] < self.n_sink)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        return self.o_proj(y) if self.o_proj is not None else y


# ---- Mamba2 --------------------------------------------------------------------------------------
def segsum(x: Tensor) -> Tensor:
    """out[..., i, j] = sum(x[..., j+1:i+1]) for j <= i, -inf above the diagonal."""
    t = x.size(-1)
    x = x[..., None].expand(*x.shape, t)
    x = x.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1), 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device)), -torch.inf)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD: x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], state [b,h,p,n] -> (y, final state)."""
    out_dtype, work = x.dtype, (torch.float64 if x.dtype == torch.float64 else torch.float32)
    x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    n = B.shape[3]
    pad = (-l) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (l + pad) // chunk_size
    B = B.repeat_interleave(h // B.shape[2], dim=2).reshape(b, c, chunk_size, h, n)
    C = C.repeat_interleave(h // C.shape[2], dim=2).reshape(b, c, chunk_size, h, n)
    X = (x * dt[..., None]).reshape(b, c, chunk_size, h, p)
    A_dt = (dt * A).reshape(b, c, chunk_size, h).permute(0, 3, 1, 2)
    A_cum = torch.cumsum(A_dt, dim=-1)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, torch.exp(segsum(A_dt)), X)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, torch.exp(A_cum[..., -1:] - A_cum), X)
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=work, device=x.device)
    states = torch.cat([initial_state[:, None].to(work), states], dim=1)
    states = torch.einsum("bhzc,bchpn->bzhpn", torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0)))), states)
    states, final_state = states[:, :-1], states[:, -1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cum))
    return (y_diag + y_off).reshape(b, c * chunk_size, h, p)[:, :l].to(out_dtype), final_state


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """One decoding step of the recurrence S = exp(dt A) S + dt x B^T, y = S C (l = 1)."""
    b, _, h, p = x.shape
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    rep = h // B.shape[2]
    Bh, Ch = (t[:, 0].repeat_interleave(rep, dim=1).to(work) for t in (B, C))
    dt0 = dt[:, 0].to(work)
    if state is None:
        state = x.new_zeros(b, h, p, B.shape[-1], dtype=work)
    state = state.to(work) * torch.exp(dt0 * A.to(work))[..., None, None] \
        + (dt0[..., None] * x[:, 0].to(work))[..., None] * Bh[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, Ch)[:, None].to(x.dtype), state


class ShortConv(nn.Module):
    """Weights of a depthwise causal conv (the Mamba2 mixer runs its x, B and C convs as one)."""

    def __init__(self, dim: int, d_conv: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, d_conv))
        self.bias = nn.Parameter(torch.empty(dim))


class Mamba2(nn.Module):
    """Projections to z, x, B, C, dt; causal conv + SiLU over (x, B, C); SSD scan; D skip; gated
    group RMSNorm; out_proj. Intra-hybrid variants: no norm (y * SiLU(z)), no out_proj, x given."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_state: int, n_groups: int, d_conv: int,
                 chunk_size: int, norm_eps: float, gated_norm: bool = True, project_out: bool = True,
                 external_x: bool = False):
        super().__init__()
        self.head_dim, self.d_state, self.d_conv, self.chunk_size = head_dim, d_state, d_conv, chunk_size
        d_ssm, gn = n_heads * head_dim, n_groups * d_state
        self.gn, self.external_x = gn, external_x
        self.z_proj = nn.Linear(d_model, d_ssm, bias=False)
        self.x_proj = None if external_x else nn.Linear(d_model, d_ssm, bias=False)
        self.B_proj = nn.Linear(d_model, gn, bias=False)
        self.C_proj = nn.Linear(d_model, gn, bias=False)
        self.dt_proj = nn.Linear(d_model, n_heads, bias=False)
        self.conv_x, self.conv_B, self.conv_C = ShortConv(d_ssm, d_conv), ShortConv(gn, d_conv), ShortConv(gn, d_conv)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(d_ssm, norm_eps, n_groups) if gated_norm else None
        self.out_proj = nn.Linear(d_ssm, d_model, bias=False) if project_out else None

    def forward(self, u: Tensor, positions: Tensor, state: dict | None = None, x: Tensor | None = None) -> Tensor:
        b, l = u.shape[:2]
        projs = [p for p in (self.z_proj, self.x_proj, self.B_proj, self.C_proj, self.dt_proj) if p is not None]
        parts = F.linear(u, torch.cat([p.weight for p in projs])).split([p.weight.shape[0] for p in projs], -1)
        z, dt = parts[0], parts[-1]
        xbc_t = torch.cat(([x] if self.external_x else []) + list(parts[1:-1]), dim=-1).transpose(1, 2)
        convs = (self.conv_x, self.conv_B, self.conv_C)
        prev = state.get("conv") if state is not None else None
        if prev is None:
            prev = xbc_t.new_zeros(b, xbc_t.shape[1], self.d_conv - 1)
        padded = torch.cat([prev.to(xbc_t.dtype), xbc_t], dim=-1)
        xbc = F.silu(F.conv1d(padded, torch.cat([c.weight for c in convs])[:, None, :],
                              torch.cat([c.bias for c in convs]), groups=xbc_t.shape[1])).transpose(1, 2)
        xs, Bm, Cm = xbc.split([xbc.shape[-1] - 2 * self.gn, self.gn, self.gn], dim=-1)
        xs = xs.reshape(b, l, -1, self.head_dim)
        Bm, Cm = (t.reshape(b, l, -1, self.d_state) for t in (Bm, Cm))
        dt = F.softplus(wide(dt) + wide(self.dt_bias))
        A = -torch.exp(wide(self.A_log))
        ssm = state.get("ssm") if state is not None else None
        y, final_state = ssd_step(xs, dt, A, Bm, Cm, ssm) if l == 1 else \
            ssd_scan(xs, dt, A, Bm, Cm, self.chunk_size, ssm)
        y = (y + xs * self.D.to(xs.dtype)[:, None]).flatten(2)
        if state is not None:
            state["conv"], state["ssm"] = padded[..., -(self.d_conv - 1):], final_state
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y) if self.out_proj is not None else y


# ---- intra-layer hybrid --------------------------------------------------------------------------
class BranchScale(nn.Module):
    """Per-branch scaling: none, a learnable scalar, a per-channel vector, or an input gate."""

    def __init__(self, kind: str, width: int, d_model: int):
        super().__init__()
        self.kind = kind
        if kind in ("scalar", "vector"):
            self.weight = nn.Parameter(torch.ones(1 if kind == "scalar" else width))
        elif kind == "gate":
            self.gate = nn.Linear(d_model, width, bias=False)

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        if self.kind in ("scalar", "vector"):
            return y * self.weight
        return y * torch.sigmoid(self.gate(x)) if self.kind == "gate" else y


class DiffLambda(nn.Module):
    """Differential-Transformer lambda = exp(q1.k1) - exp(q2.k2) + lambda_init."""

    def __init__(self, dim: int, layer_id: int):
        super().__init__()
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_id)
        self.q1, self.k1, self.q2, self.k2 = (nn.Parameter(torch.zeros(dim)) for _ in range(4))

    def forward(self) -> Tensor:
        return torch.exp((self.q1 * self.k1).sum()) - torch.exp((self.q2 * self.k2).sum()) + self.lambda_init


def branch_norm(kind: str, width: int, n_heads: int, eps: float) -> nn.Module:
    if kind == "group":
        return HeadGroupNorm(width, n_heads, eps)
    return RMSNorm(width, eps) if kind == "rms" else nn.Identity()


class IntraHybrid(nn.Module):
    """out = W_out(a_ssm * Norm(Mamba2(x)) (+) a_attn * Norm(Attention(x))), fusion add/subtract/concat."""

    def __init__(self, config: HybridConfig, layer_id: int):
        super().__init__()
        ic = self.ic = config.intra
        d, eps = config.d_model, config.norm_eps
        attn_width, ssm_width = ic["attn_heads"] * ic["head_dim"], ic["ssm_heads"] * ic["head_dim"]
        self.attn = Attention(d, ic["attn_heads"], ic["kv_heads"], ic["qk_head_dim"], config.rope,
                              v_head_dim=ic["head_dim"], project_out=False)
        self.ssm = Mamba2(d, ic["ssm_heads"], ic["head_dim"], ic["d_state"], config.n_groups, config.d_conv,
                          config.chunk_size, eps, gated_norm=False, project_out=False,
                          external_x=ic["value_sharing"])
        self.norm_attn = branch_norm(ic["norm"], attn_width, ic["attn_heads"], eps)
        self.norm_ssm = branch_norm(ic["norm"], ssm_width, ic["ssm_heads"], eps)
        if ic["scaling"] == "diff":
            self.diff_lambda = DiffLambda(ic["qk_head_dim"], layer_id)
        else:
            self.scale_attn = BranchScale(ic["scaling"], attn_width, d)
            self.scale_ssm = BranchScale(ic["scaling"], ssm_width, d)
        if ic["out_proj"] == "unified":
            fused = attn_width + ssm_width if ic["fusion"] == "concat" else ssm_width
            self.out_proj = nn.Linear(fused, d, bias=False)
        else:
            d_out = d // 2 if ic["fusion"] == "concat" else d
            self.out_ssm = nn.Linear(ssm_width, d_out, bias=False)
            self.out_attn = nn.Linear(attn_width, d_out, bias=False)

    def forward(self, x: Tensor, positions: Tensor, state: dict | None = None) -> Tensor:
        ic = self.ic
        attn_state = state.setdefault("attn", {}) if state is not None else None
        ssm_state = state.setdefault("ssm", {}) if state is not None else None
        v = shared_v = None
        if ic["value_sharing"]:
            v = self.attn.values(x)
            shared_v = v.repeat_interleave(ic["attn_heads"] // ic["kv_heads"], dim=2).flatten(2)
        y_attn = self.norm_attn(self.attn(x, positions, attn_state, v=v))
        y_ssm = self.norm_ssm(self.ssm(x, positions, ssm_state, x=shared_v))
        if ic["scaling"] == "diff":
            y_attn = y_attn * self.diff_lambda()
        else:
            y_attn, y_ssm = self.scale_attn(y_attn, x), self.scale_ssm(y_ssm, x)
        if ic["out_proj"] == "separate":
            y_ssm, y_attn = self.out_ssm(y_ssm), self.out_attn(y_attn)
        if ic["fusion"] == "concat":
            fused = torch.cat([y_ssm, y_attn], dim=-1)
        else:
            fused = y_ssm + y_attn if ic["fusion"] == "add" else y_ssm - y_attn
        return self.out_proj(fused) if ic["out_proj"] == "unified" else fused


# ---- feed-forward --------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ffn, bias=False)
        self.w3 = nn.Linear(d_model, d_ffn, bias=False)
        self.w2 = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RoutedExperts(nn.Module):
    """E SwiGLU experts as stacked weights [E, in, out]; each token row runs through its experts."""

    def __init__(self, d_model: int, d_expert: int, n_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_expert, d_model))

    def forward(self, flat: Tensor, ids: Tensor, gates: Tensor) -> Tensor:
        out = torch.zeros_like(flat)
        for e in range(self.w1.shape[0]):
            token, slot = (ids == e).nonzero(as_tuple=True)
            if token.numel():
                xe = flat[token]
                h = F.silu(xe @ self.w1[e]) * (xe @ self.w3[e])
                out.index_add_(0, token, (h @ self.w2[e]) * gates[token, slot, None].to(flat.dtype))
        return out


class MoE(nn.Module):
    """Shared experts + top-k of E routed SwiGLU experts; sigmoid scores, `expert_bias` (learnt
    during training by load balancing) added to the scores only to choose the experts."""

    def __init__(self, d_model: int, d_expert: int, n_experts: int, top_k: int, n_shared: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = RoutedExperts(d_model, d_expert, n_experts)
        self.shared = nn.ModuleList(SwiGLU(d_model, d_expert) for _ in range(n_shared))
        self.register_buffer("expert_bias", torch.zeros(n_experts))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(wide(self.router(flat)))
        ids = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        gates = scores.gather(-1, ids)
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return self.experts(flat, ids, gates).reshape(shape) + sum(s(x) for s in self.shared)


# ---- the model -----------------------------------------------------------------------------------
class HybridBlock(nn.Module):
    def __init__(self, config: HybridConfig, symbol: str, layer_id: int):
        super().__init__()
        c = config
        self.mixer_norm = RMSNorm(c.d_model, c.norm_eps)
        if symbol in "AS":
            sliding = symbol == "S"
            rope = {"theta": c.swa_rope_theta, "factor": None} if sliding else c.rope
            self.mixer = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, rope,
                                   window=c.window if sliding else None, n_sink=c.n_sink if sliding else 0)
        elif symbol == "M":
            self.mixer = Mamba2(c.d_model, c.d_ssm // c.ssm_head_dim, c.ssm_head_dim, c.d_state, c.n_groups,
                                c.d_conv, c.chunk_size, c.norm_eps)
        elif symbol == "H":
            self.mixer = IntraHybrid(c, layer_id)
        else:
            raise ValueError(f"config.blocks: unknown block symbol {symbol!r} (known: A, S, M, H)")
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        if c.moe is None:
            self.ffn = SwiGLU(c.d_model, c.d_ffn)
        else:
            m = c.moe
            self.ffn = MoE(c.d_model, m.get("d_expert") or c.d_ffn // 2, m["n_experts"], m["top_k"], m["n_shared"])

    def forward(self, x: Tensor, positions: Tensor, state: dict | None) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x), positions, state)
        return x + self.ffn(self.ffn_norm(x))


class HybridCache:
    """Decoding state: per layer a dict (attention: k, v and the keys' positions; Mamba2: conv and
    ssm; intra-hybrid: both under 'attn' / 'ssm'), and the number of tokens seen."""

    def __init__(self, n_layers: int):
        self.layers: list[dict] = [{} for _ in range(n_layers)]
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass
class HybridCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hybrid_cache: HybridCache | None = None


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["HybridBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """A fresh model's init (built from a config, not loaded): training's distributions, except
        that every projection draws with init_std (training scales the residual-writing ones down).
        Tensors transformers flags as loaded from the checkpoint are left alone."""
        def init(t: Tensor, value) -> None:
            if not getattr(t, "_is_hf_initialized", False):
                t.copy_(value(t) if callable(value) else value)

        std, c = self.config.init_std, self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init(module.weight, lambda t: torch.randn_like(t) * std)
        elif isinstance(module, (RMSNorm, HeadGroupNorm)) or (isinstance(module, BranchScale) and module.kind in
                                                              ("scalar", "vector")):
            init(module.weight, 1.0)
            if isinstance(module, HeadGroupNorm):
                init(module.bias, 0.0)
        elif isinstance(module, DiffLambda):
            for p in (module.q1, module.k1, module.q2, module.k2):
                init(p, lambda t: torch.randn_like(t) * 0.1)
        elif isinstance(module, ShortConv):
            bound = 1 / math.sqrt(module.weight.shape[-1])
            for p in (module.weight, module.bias):
                init(p, lambda t: torch.empty_like(t).uniform_(-bound, bound))
        elif isinstance(module, Mamba2):
            def dt_bias(t: Tensor) -> Tensor:  # inverse softplus of dt, log-uniform in [dt_min, dt_max]
                lo, hi = math.log(c.dt_min), math.log(c.dt_max)
                dt = torch.exp(torch.rand_like(t) * (hi - lo) + lo).clamp(min=1e-4)
                return dt + torch.log(-torch.expm1(-dt))

            init(module.dt_bias, dt_bias)
            init(module.A_log, lambda t: torch.empty_like(t).uniform_(*c.a_init_range).log())
            init(module.D, 1.0)
        elif isinstance(module, RoutedExperts):
            for w in (module.w1, module.w3, module.w2):
                init(w, lambda t: torch.randn_like(t) * std)
        elif isinstance(module, MoE):
            init(module.expert_bias, 0.0)


class HybridModel(HybridPreTrainedModel):
    """Embedding -> blocks -> final RMSNorm (hidden states)."""

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(HybridBlock(config, s, i) for i, s in enumerate(config.blocks))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: Tensor, cache: HybridCache | None = None) -> Tensor:
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.norm(x)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Logits = hidden states @ head (the embedding when `config.tie_embeddings`)."""

    _is_stateful = True  # the cache cannot be cropped (no assisted decoding)

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, hybrid_cache: HybridCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None, **kwargs) -> HybridCausalLMOutput:
        """input_ids [b, l] -> logits [b, l, vocab]; with `labels`, the mean next-token loss (-100
        ignored). `hybrid_cache` is read and advanced in place; a new one is made if `use_cache`. Other
        keywords transformers passes (return_dict, output_* flags) are accepted and ignored, but not
        the ones that would change the result: past_key_values, position_ids, inputs_embeds."""
        for name, instead in (("past_key_values", "pass the previous output's hybrid_cache as hybrid_cache"),
                              ("position_ids", "positions follow hybrid_cache; leave them out"),
                              ("inputs_embeds", "pass input_ids")):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: this model does not take it ({instead})")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask has padding: this model takes unpadded sequences; "
                             "batch prompts of one length or generate one prompt at a time")
        if use_cache and hybrid_cache is None:
            hybrid_cache = HybridCache(len(self.model.layers))
        h = self.model(input_ids, hybrid_cache)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = h @ weight.t()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return HybridCausalLMOutput(loss=loss, logits=logits, hybrid_cache=hybrid_cache)

    # ---- generation: our own cache object, passed between steps under `hybrid_cache` ------------
    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, greedy or sampled. Beam search would need the cache reordered
        across beams, which transformers does only for its own cache names: refused, not silently wrong."""
        config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or config.num_beams or 1) > 1:
            raise ValueError("num_beams > 1: this model's cache does not support beam search; "
                             "use greedy or sampled decoding")
        return super().generate(*args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids: Tensor, hybrid_cache: HybridCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool = True,
                                      **kwargs) -> dict:
        if hybrid_cache is not None:
            input_ids = input_ids[:, hybrid_cache.length:]  # only the tokens the cache has not seen
        return {"input_ids": input_ids, "attention_mask": attention_mask, "hybrid_cache": hybrid_cache,
                "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs: HybridCausalLMOutput, model_kwargs: dict,
                                            is_encoder_decoder: bool = False, num_new_tokens: int = 1) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        model_kwargs["hybrid_cache"] = outputs.hybrid_cache
        return model_kwargs
