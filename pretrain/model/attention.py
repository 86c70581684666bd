"""Grouped-query attention with RoPE; global or sliding-window with attention sinks; KV cache."""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from torch.distributed.tensor import Placement, Shard

from parallel.context_parallel import all_gather_sequence, to_natural_order
from parallel.tensor_parallel import linear
from pretrain.model.config import RopeConfig
from pretrain.model.ops import attention, causal_suffix_attention, document_attention
from pretrain.model.packed import PackedDocs
from pretrain.model.rope import apply_rope, rope_cos_sin, rope_inv_freq
from pretrain.model.static_cache import StaticKV


class Attention(nn.Module):
    """`n_heads` query heads of `qk_head_dim`, `n_kv_heads` K/V heads (V of `v_head_dim`).

    With `project_out=False` the module returns the heads' output [b, l, n_heads * v_head_dim]
    unprojected (the intra-hybrid mixer projects and fuses it itself). With `shared_values=True` the
    caller computes V (`values`, shared with its Mamba2 branch) and passes it to `forward`.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, qk_head_dim: int, rope: RopeConfig,
                 v_head_dim: int | None = None, window: int | None = None, n_sink: int = 0,
                 project_out: bool = True, init_std: float = 0.02, out_init_std: float = 0.02,
                 shared_values: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.shared_values = n_heads, n_kv_heads, shared_values
        self.qk_head_dim, self.v_head_dim = qk_head_dim, v_head_dim or qk_head_dim
        self.window, self.n_sink, self.rope = window, n_sink, rope
        self.init_std, self.out_init_std = init_std, out_init_std
        self.q_proj = nn.Linear(d_model, n_heads * qk_head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * qk_head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_head_dim, d_model, bias=False) if project_out else None
        self.cp_group = None  # context parallelism: keys/values are gathered from these ranks

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
        if self.o_proj is not None:
            nn.init.normal_(self.o_proj.weight, std=self.out_init_std)

    def shard_for_tp(self, tp: int, group=None) -> dict[str, Placement]:
        """Heads split over the TP ranks: Q/K/V column-parallel, the output row-parallel."""
        if self.n_kv_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide the attention's K/V heads (model.overrides.n_kv_heads="
                             f"{self.n_kv_heads}; each rank keeps whole heads); choose a tp that divides it")
        plan: dict[str, Placement] = {f"{p}_proj.weight": Shard(0) for p in "qkv"}
        if self.o_proj is not None:
            plan["o_proj.weight"] = Shard(1)
        return plan

    def projections(self) -> list[nn.Linear]:
        """The input projections a decoder packs, in order: [q, k, v], or [q, k] when V is shared."""
        return [self.q_proj, self.k_proj] + ([] if self.shared_values else [self.v_proj])

    def values(self, x: Tensor) -> Tensor:
        """V heads [b, l, n_kv_heads, v_head_dim] (shared with the Mamba branch under value sharing)."""
        return linear(x, self.v_proj).unflatten(-1, (-1, self.v_head_dim))

    def forward(self, x: Tensor, positions: Tensor | PackedDocs, state: dict | StaticKV | None = None,
                v: Tensor | None = None) -> Tensor:
        """x [b, l, d]; positions [l] absolute, or PackedDocs (attention within documents);
        `state` is the KV cache (a dict that grows, or a preallocated `StaticKV`), updated in place."""
        b, l = x.shape[:2]
        packed = state.packed if isinstance(state, StaticKV) and l == 1 else None
        assert v is not None or not self.shared_values, "shared_values: the caller passes V"
        if packed is not None:  # a decode step: Q, K (and V unless shared) as one GEMV on the packed weights
            q, k, *own_v = F.linear(x, packed).split([t.weight.shape[0] for t in self.projections()], dim=-1)
            q, k = (t.view(b, l, -1, self.qk_head_dim).transpose(1, 2) for t in (q, k))
            v = (own_v[0].view(b, l, -1, self.v_head_dim) if v is None else v).transpose(1, 2)
        else:
            q = linear(x, self.q_proj).view(b, l, -1, self.qk_head_dim).transpose(1, 2)  # local heads under TP
            k = linear(x, self.k_proj).view(b, l, -1, self.qk_head_dim).transpose(1, 2)
            v = (v if v is not None else self.values(x)).transpose(1, 2)
        docs = positions if isinstance(positions, PackedDocs) else None
        rope_pos = docs.positions if docs is not None else positions
        cos, sin = rope_cos_sin(rope_pos, rope_inv_freq(self.qk_head_dim, self.rope, rope_pos.device))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if docs is not None:
            y = self._documents(q, k, v, docs, state)
        elif self.cp_group is not None:
            y = self._context_parallel(q, k, v, positions)
        elif isinstance(state, StaticKV):
            y = state.attend(q, k, v, positions, self.window, self.n_sink)
        else:
            k, v, k_pos = self._with_cache(k, v, positions, state)
            y = attention(q, k, v, positions, k_pos, self.window, self.n_sink)
        y = y.transpose(1, 2).flatten(2)
        return linear(y, self.o_proj) if self.o_proj is not None else y

    def _with_cache(self, k: Tensor, v: Tensor, positions: Tensor, state: dict | None) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and key positions including the cached ones; the cache (when given) is
        updated in place."""
        k_pos = positions
        if state is None:
            return k, v, k_pos
        if "k" in state:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
            k_pos = torch.cat([state["pos"], positions])
        state["k"], state["v"], state["pos"] = k, v, k_pos
        if self.window is not None:  # later queries see only sinks + window: drop the rest
            keep = (k_pos < self.n_sink) | (k_pos > positions[-1] - self.window)
            state["k"], state["v"], state["pos"] = k[:, :, keep], v[:, :, keep], k_pos[keep]
        return k, v, k_pos

    def _documents(self, q: Tensor, k: Tensor, v: Tensor, docs: PackedDocs, state: dict | None) -> Tensor:
        """Attention within documents. Under CP every rank's keys, values, key positions and
        document ids are gathered; each query chunk attends to the keys up to its end. With a KV
        cache, the cache keeps the keys' in-document positions and document ids (untrimmed)."""
        q_pos, q_doc = docs.positions, docs.doc
        if self.cp_group is not None:
            rank, cp = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
            k, v = (to_natural_order(all_gather_sequence(t, self.cp_group, dim=2), self.cp_group, dim=2)
                    for t in (k, v))
            k_pos, k_doc = docs.gathered(self.cp_group)
            chunk, out = q.shape[2] // 2, []
            for i, chunk_id in enumerate((rank, 2 * cp - 1 - rank)):
                mine, end = slice(i * chunk, (i + 1) * chunk), (chunk_id + 1) * chunk
                out.append(document_attention(q[:, :, mine], k[:, :, :end], v[:, :, :end], q_pos[:, mine],
                                              k_pos[:, :end], q_doc[:, mine], k_doc[:, :end], self.window,
                                              self.n_sink, docs.kernel_cache))
            return torch.cat(out, dim=2)
        k_pos, k_doc = q_pos, q_doc
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
                k_pos, k_doc = torch.cat([state["pos"], q_pos], dim=1), torch.cat([state["doc"], q_doc], dim=1)
            state["k"], state["v"], state["pos"], state["doc"] = k, v, k_pos, k_doc
        return document_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, self.window, self.n_sink, docs.kernel_cache)

    def _context_parallel(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """This rank's queries (chunks r and 2cp-1-r of `shard_index`) over every rank's keys and
        values, gathered with their positions. Each query chunk is contiguous, so it attends to the
        keys up to its end only: lower-right causal for global attention; for a sliding window, the
        sinks and the window before the chunk (at most chunk + window keys, masked by position)."""
        rank, cp = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
        k, v = (to_natural_order(all_gather_sequence(t, self.cp_group, dim=2), self.cp_group, dim=2) for t in (k, v))
        k_pos = to_natural_order(all_gather_sequence(positions, self.cp_group, dim=0), self.cp_group, dim=0)
        chunk = q.shape[2] // 2
        out = []
        for i, chunk_id in enumerate((rank, 2 * cp - 1 - rank)):
            qc, end = q[:, :, i * chunk:(i + 1) * chunk], (chunk_id + 1) * chunk
            if self.window is None:
                out.append(causal_suffix_attention(qc, k[:, :, :end], v[:, :, :end]))
                continue
            start = max(0, end - chunk - self.window + 1)
            keys = torch.cat([torch.arange(min(self.n_sink, start), device=q.device),
                              torch.arange(start, end, device=q.device)])
            out.append(attention(qc, k[:, :, keys], v[:, :, keys], positions[i * chunk:(i + 1) * chunk], k_pos[keys],
                                 self.window, self.n_sink))
        return torch.cat(out, dim=2)


def attention_from_config(cfg, sliding: bool, layer_id: int) -> Attention:
    """The 'A' / 'S' block mixer of a ModelConfig."""
    rope = RopeConfig(theta=cfg.swa_rope_theta, factor=None) if sliding else cfg.rope
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, rope,
                     window=cfg.window if sliding else None, n_sink=cfg.n_sink if sliding else 0,
                     init_std=cfg.init_std, out_init_std=cfg.out_init_std)
