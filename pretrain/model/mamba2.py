"""Mamba2 (SSD) mixer: projections to z, x, B, C, dt; causal conv over (x, B, C); SiLU; SSD scan;
D skip; gated group-local RMSNorm; out_proj. Conv and SSM states for decoding.

The projection and the conv are stored as one module per part (z, x, B, C, dt; conv over x, B, C)
rather than Mamba's packed `in_proj` / `conv1d`, so that each part has one clean placement under
tensor parallelism: z, x, dt and the x-conv shard by SSM head, B and C by group (replicated when
n_groups does not divide over the ranks, e.g. the paper's n_groups = 1). Without TP the parts run
as one GEMM and one conv, exactly as the packed layout did; weights saved in the packed layout
convert on load (`pretrain.model.legacy`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Placement, Replicate, Shard

from parallel.context_parallel import all_gather_sequence, head_slice, heads_to_sequence, sequence_to_heads, \
    to_natural_order
from parallel.tensor_parallel import linear, local, local_replicated
from pretrain.model.legacy import MAMBA_PARTS, convert, mamba_splits
from pretrain.model.norms import GatedRMSNorm
from pretrain.model.ops import causal_conv1d, ssd_scan
from pretrain.model.ops.mamba2_step import mamba2_step
from pretrain.model.ops.conv import padded_doc_ids
from pretrain.model.ops.precision import wide
from pretrain.model.packed import PackedDocs


class ShortConv(nn.Module):
    """The weights of a depthwise causal conv over `dim` channels (applied by the owner, which
    runs the x, B and C convs as one kernel)."""

    def __init__(self, dim: int, d_conv: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, d_conv))
        self.bias = nn.Parameter(torch.empty(dim))


class Mamba2(nn.Module):
    """`n_heads` heads of `head_dim` (d_ssm = n_heads * head_dim), `n_groups` B/C groups of `d_state`.

    Variants used by the intra-hybrid mixer: `gated_norm=False` returns y * SiLU(z) without the
    norm (the hybrid normalises branches itself), `project_out=False` skips out_proj, and
    `external_x=True` takes x from the caller (value sharing) so no x projection exists.

    Under tensor parallelism (`shard_for_tp`) every per-head tensor is this rank's shard: shapes
    below are read from the local tensors, never from the global head counts.
    """

    PARTS = MAMBA_PARTS

    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_state: int, n_groups: int = 1,
                 d_conv: int = 4, chunk_size: int = 256, a_init_range: tuple[float, float] = (0.01, 2.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, norm_eps: float = 1e-5,
                 gated_norm: bool = True, project_out: bool = True, external_x: bool = False,
                 init_std: float = 0.02, out_init_std: float = 0.02):
        super().__init__()
        self.n_heads, self.head_dim, self.d_state, self.n_groups = n_heads, head_dim, d_state, n_groups
        self.d_ssm = n_heads * head_dim
        self.chunk_size, self.external_x, self.d_conv = chunk_size, external_x, d_conv
        self.a_init_range, self.dt_min, self.dt_max = a_init_range, dt_min, dt_max
        self.init_std, self.out_init_std = init_std, out_init_std
        self.conv_dim = self.d_ssm + 2 * n_groups * d_state
        self.bc_tp_group: dist.ProcessGroup | None = None  # set when B/C are replicated over TP ranks
        self.cp_group: dist.ProcessGroup | None = None  # context parallelism (see _to_heads)
        gn = n_groups * d_state
        self.z_proj = nn.Linear(d_model, self.d_ssm, bias=False)
        self.x_proj = None if external_x else nn.Linear(d_model, self.d_ssm, bias=False)
        self.B_proj = nn.Linear(d_model, gn, bias=False)
        self.C_proj = nn.Linear(d_model, gn, bias=False)
        self.dt_proj = nn.Linear(d_model, n_heads, bias=False)
        self.conv_x, self.conv_B, self.conv_C = ShortConv(self.d_ssm, d_conv), ShortConv(gn, d_conv), ShortConv(gn, d_conv)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(self.d_ssm, norm_eps, n_groups) if gated_norm else None
        self.out_proj = nn.Linear(self.d_ssm, d_model, bias=False) if project_out else None
        self.register_load_state_dict_pre_hook(_split_packed_on_load)

    def projections(self) -> list[nn.Linear]:
        """The input projections in the packed order [z, x, B, C, dt] (x absent when external)."""
        return [p for p in (self.z_proj, self.x_proj, self.B_proj, self.C_proj, self.dt_proj) if p is not None]

    def convs(self) -> list[ShortConv]:
        return [self.conv_x, self.conv_B, self.conv_C]

    def conv_weights(self) -> tuple[Tensor, Tensor]:
        """(weight [c, d_conv], bias [c]) of the x, B and C convs as one conv over this rank's [x, B, C]."""
        return (torch.cat([self._conv_part(c.weight, n) for c, n in zip(self.convs(), "xBC")]),
                torch.cat([self._conv_part(c.bias, n) for c, n in zip(self.convs(), "xBC")]))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Drawn as the packed tensors and split, so the initial weights do not depend on the layout.
        projs = self.projections()
        w = projs[0].weight
        packed = torch.empty(sum(p.weight.shape[0] for p in projs), w.shape[1], device=w.device, dtype=w.dtype)
        nn.init.normal_(packed, std=self.init_std)
        for p, w in zip(projs, packed.split([p.weight.shape[0] for p in projs])):
            p.weight.copy_(w)
        bound = 1 / math.sqrt(self.d_conv)  # nn.Conv1d's default for depthwise
        like = {"device": self.conv_x.weight.device, "dtype": self.conv_x.weight.dtype}
        weight, bias = torch.empty(self.conv_dim, self.d_conv, **like), torch.empty(self.conv_dim, **like)
        nn.init.uniform_(weight, -bound, bound)
        nn.init.uniform_(bias, -bound, bound)
        sizes = [c.bias.shape[0] for c in self.convs()]
        for c, w, b in zip(self.convs(), weight.split(sizes), bias.split(sizes)):
            c.weight.copy_(w)
            c.bias.copy_(b)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.n_heads) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.empty(self.n_heads).uniform_(*self.a_init_range).log())
        nn.init.ones_(self.D)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, std=self.out_init_std)

    def shard_for_tp(self, tp: int, group: dist.ProcessGroup) -> dict[str, Placement]:
        """z, x, dt, the x-conv, dt_bias, A_log, D and the norm by SSM head; out_proj row-parallel;
        B and C (and their convs) by group when n_groups % tp == 0, else (n_groups = 1) replicated
        and computed on every rank, their gradients summed over `group`. A gated norm whose one
        group spans the ranks all-reduces its sum of squares, so it stays exact."""
        if self.n_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide the Mamba2 heads ({self.n_heads}); choose a tp "
                             "that divides them")
        if self.n_groups % tp and self.n_groups != 1:
            raise ValueError(f"parallel.tp={tp}: Mamba2 n_groups={self.n_groups} must be 1 or a multiple of tp")
        bc: Placement = Shard(0) if self.n_groups % tp == 0 else Replicate()
        self.bc_tp_group = None if isinstance(bc, Shard) else group
        plan: dict[str, Placement] = {n: Shard(0) for n in ("z_proj.weight", "dt_proj.weight", "conv_x.weight",
                                                              "conv_x.bias", "dt_bias", "A_log", "D")}
        if self.x_proj is not None:
            plan["x_proj.weight"] = Shard(0)
        for name in ("B_proj.weight", "C_proj.weight", "conv_B.weight", "conv_B.bias", "conv_C.weight", "conv_C.bias"):
            plan[name] = bc
        if self.norm is not None:
            plan["norm.weight"] = Shard(0)
            if self.n_groups % tp:
                self.norm.tp_group = group
        if self.out_proj is not None:
            plan["out_proj.weight"] = Shard(1)
        return plan

    def _w(self, p: Tensor, part: str) -> Tensor:
        """This rank's tensor of a parameter; B/C parts replicated over TP sum their gradients."""
        return local_replicated(p, self.bc_tp_group) if part in "BC" else local(p)

    def _project(self, u: Tensor, x: Tensor | None, packed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(z, [x, B, C] before the conv, dt): one GEMM for all parts. `packed`: the parts' weights
        concatenated once by the static decoder (`Decoder`), for a one-token step."""
        parts = [n for n in self.PARTS if not (self.external_x and n == "x")]
        weights = [self._w(p.weight, n) for p, n in zip(self.projections(), parts, strict=True)]
        sizes = [w.shape[0] for w in weights]
        if u.shape[1] == 1 and packed is None:  # decoding: one GEMV per part, not a copy of every weight per token
            z, *middle, dt = (F.linear(u, w) for w in weights)
        else:  # one GEMM (the packed one when decoding); x, B, C are adjacent columns: a view, no copy
            weight = packed if packed is not None and u.shape[1] == 1 else torch.cat(weights)
            z, xbc, dt = F.linear(u, weight).split([sizes[0], sum(sizes[1:-1]), sizes[-1]], dim=-1)
            middle = [xbc]
        parts = ([x] if self.external_x else []) + middle
        return z, torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0], dt

    def forward(self, u: Tensor, positions: Tensor | PackedDocs | None = None, state: dict | None = None,
                x: Tensor | None = None) -> Tensor:
        """u [b, l, d_model] -> [b, l, d_model] (or [b, l, d_ssm] unprojected); positions unused
        (the scan is position-free), taken for the common mixer signature; PackedDocs reset the
        conv and the scan at each document start.

        `state` {"conv": [b, conv_dim, d_conv-1], "ssm": [b, h, p, n]} is read and updated in place;
        `x` [b, l, d_ssm] is the shared value when `external_x`.
        """
        b = u.shape[0]
        z, xbc, dt = self._project(u, x, getattr(state, "packed", None))  # a static cache's SSMState has it
        seq_idx = positions.doc if isinstance(positions, PackedDocs) else None
        if self.cp_group is not None:
            xbc, dt = self._to_heads(xbc, dt)
            if seq_idx is not None:  # the scan sees every token: every rank's document ids
                seq_idx = positions.gathered(self.cp_group)[1]
        l = xbc.shape[1]
        conv_state = state.get("conv") if state is not None else None
        weight, bias = getattr(state, "packed_conv", None) or self.conv_weights()  # a static cache packs them
        if l == 1 and conv_state is not None and self.cp_group is None:  # a decode step: conv, scan and D skip
            y, state["conv"], state["ssm"] = mamba2_step(
                xbc[:, 0], dt[:, 0], conv_state, weight, bias, self._per_head(self.dt_bias),
                self._per_head(self.A_log), self._per_head(self.D), state.get("ssm"), self.head_dim)
            return self._output(y[:, None], z)
        xbc_t = xbc.transpose(1, 2)
        cache = positions.kernel_cache if isinstance(positions, PackedDocs) else None
        xbc = causal_conv1d(xbc_t, weight, bias, conv_state, seq_idx, cache).transpose(1, 2)
        gn = local(self.conv_B.bias).shape[0]
        xs, Bm, Cm = xbc.split([xbc.shape[-1] - 2 * gn, gn, gn], dim=-1)
        xs = xs.reshape(b, l, -1, self.head_dim)
        Bm, Cm = (self._groups_for_heads(t.reshape(b, l, -1, self.d_state)) for t in (Bm, Cm))
        dt = F.softplus(wide(dt) + wide(self._per_head(self.dt_bias)))
        A = -torch.exp(wide(self._per_head(self.A_log)))
        y, final_state = ssd_scan(xs, dt, A, Bm, Cm, self.chunk_size, state.get("ssm") if state is not None else None,
                                  seq_idx)
        y = y + xs * self._per_head(self.D).to(xs.dtype)[:, None]
        if self.cp_group is not None:
            y = heads_to_sequence(y, self.cp_group)
        y = y.flatten(2)
        if state is not None:
            prev = conv_state if conv_state is not None else xbc_t.new_zeros(b, xbc_t.shape[1], self.d_conv - 1)
            state["conv"] = torch.cat([prev, xbc_t], dim=-1)[..., -(self.d_conv - 1):]
            if seq_idx is not None:  # only the last document's inputs carry over into decoding
                docs = padded_doc_ids(seq_idx, self.d_conv)[:, -(self.d_conv - 1):]
                state["conv"] = state["conv"] * (docs == seq_idx[:, -1:])[:, None].to(xbc_t.dtype)
            state["ssm"] = final_state
        return self._output(y, z)

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        """The gate (in the group norm, or plain) and out_proj of the scan's y [b, l, d_ssm]."""
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return linear(y, self.out_proj) if self.out_proj is not None else y

    # ---- context parallelism: the scan runs on every token for a share of the heads ----------
    def enable_cp(self, group: dist.ProcessGroup, tp: int) -> None:
        """Switch to head-sharded scans over `group` (Megatron-core's all-to-all approach; the
        state-passing alternative is not built). Heads per rank: n_heads / (tp * cp)."""
        cp = dist.get_world_size(group)
        if self.n_heads % (tp * cp):
            raise ValueError(f"parallel.tp={tp} x parallel.cp={cp} must divide the Mamba2 heads ({self.n_heads}); "
                             "choose sizes whose product divides them")
        local_groups = self.n_groups // tp if self.n_groups % tp == 0 else 1
        if local_groups > 1 and local_groups % cp:
            raise ValueError(f"parallel.cp={cp} must divide the Mamba2 groups per TP rank ({local_groups}); "
                             "change n_groups or parallel.cp")
        self.cp_group = group

    def _to_heads(self, xbc: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's tokens of every local head -> every token of this rank's share of heads;
        B and C (per group, not per head) are gathered whole."""
        gn = local(self.conv_B.bias).shape[0]
        xs, bc = xbc.split([xbc.shape[-1] - 2 * gn, 2 * gn], dim=-1)
        xs = sequence_to_heads(xs.unflatten(-1, (-1, self.head_dim)), self.cp_group).flatten(2)
        dt = sequence_to_heads(dt.unsqueeze(-1), self.cp_group).squeeze(-1)
        bc = to_natural_order(all_gather_sequence(bc, self.cp_group), self.cp_group)
        return torch.cat([xs, bc], dim=-1), dt

    def _per_head(self, p: Tensor) -> Tensor:
        t = local(p)
        return head_slice(t, self.cp_group) if self.cp_group is not None else t

    def _conv_part(self, p: Tensor, part: str) -> Tensor:
        return self._per_head(p) if part == "x" else self._w(p, part)

    def _groups_for_heads(self, t: Tensor) -> Tensor:
        """B or C [b, l, groups, n] restricted to the groups of this rank's share of heads (CP)."""
        if self.cp_group is None or t.shape[2] == 1:
            return t
        return head_slice(t.transpose(0, 2), self.cp_group).transpose(0, 2)


def _split_packed_on_load(module: Mamba2, state_dict: dict, prefix: str, *args) -> None:
    """Weights saved before the split (packed `in_proj.weight`, `conv_weight`, `conv_bias`) load."""
    convert(state_dict, mamba_splits(prefix, module.n_heads, module.d_ssm, module.n_groups * module.d_state,
                                     module.external_x))


def mamba2_from_config(cfg, layer_id: int) -> Mamba2:
    """The 'M' block mixer of a ModelConfig."""
    return Mamba2(cfg.d_model, cfg.ssm_heads, cfg.ssm_head_dim, cfg.d_state, cfg.n_groups, cfg.d_conv,
                  cfg.chunk_size, cfg.a_init_range, cfg.dt_min, cfg.dt_max, cfg.norm_eps,
                  init_std=cfg.init_std, out_init_std=cfg.out_init_std)
