"""Preallocated decoding state: fixed-address buffers that a decode step writes in place, so the
step has static shapes and can be replayed as a CUDA graph.

Per layer: `StaticKV` for attention (global: one slot per position; sliding window: the sinks plus
a ring of `window` slots), `SSMState` for Mamba2 (conv + SSM state), both for an intra-hybrid
block. The dynamic `InferenceCache` (lm.py) stays as the reference the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.model.ffn import SwiGLU
from pretrain.model.ops.attention import attention
from pretrain.model.ops.decode_attention import decode_attention
from pretrain.model.ops.precision import wide_dtype

EMPTY = 2 ** 62  # key position of an empty slot: later than any query, so the causal mask hides it


def chunk_of(n: int, cap: int = 256) -> int:
    """The largest power of two <= `cap` dividing `n` (n > 0)."""
    return min(n & -n, cap)


class StaticKV:
    """K [C, b, kv, c, dq], V [C, b, kv, c, dv] in chunks of `c` slots, and each slot's key
    position [C * c] (EMPTY when unused).

    Chunk-major, so that the first `span` slots are one contiguous block: a decode step reads them
    as C * b * kv small matrices (split-K attention, `decode_attention`) without a copy. Global
    attention keeps position p in slot p (capacity `max_len` rounded up to whole chunks); a sliding
    window keeps the `n_sink` first positions in slots 0..n_sink-1 and position p >= n_sink in slot
    n_sink + (p - n_sink) % window, so it never holds more than window + sinks keys. Masking reads
    the slots' positions.
    """

    def __init__(self, batch: int, kv_heads: int, qk_dim: int, v_dim: int, max_len: int,
                 window: int | None, n_sink: int, dtype: torch.dtype, device: torch.device, chunk: int = 256):
        self.window, self.n_sink = window, n_sink
        if window is None:
            self.chunk = chunk
            self.capacity = -(-max_len // chunk) * chunk
        else:
            self.capacity = window + n_sink
            self.chunk = chunk_of(self.capacity)
        n = self.capacity // self.chunk
        self.k = torch.zeros(n, batch, kv_heads, self.chunk, qk_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n, batch, kv_heads, self.chunk, v_dim, dtype=dtype, device=device)
        self.pos = torch.full((self.capacity,), EMPTY, dtype=torch.long, device=device)
        self.span = self.capacity  # slots a decode step attends to (a static shape per CUDA graph)
        self.filled = False
        self.decode_fn = decode_attention  # a decode step's attention read (set by the Decoder's `attention`)
        self.write_fn = StaticKV._write  # and its write of the new keys and values (the same)
        self.packed: Tensor | None = None  # the layer's [q; k; v] weights in one tensor, set by the Decoder

    def slot(self, positions: Tensor) -> Tensor:
        if self.window is None:
            return positions
        ring = self.n_sink + (positions - self.n_sink) % self.window
        return torch.where(positions < self.n_sink, positions, ring)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, window: int | None, n_sink: int) -> Tensor:
        """Write k, v [b, kv, l, d] at `positions`, then the attention of q [b, h, l, dq] over what
        the cache holds (a prefill: its own keys). A decode step writes and reads in `_write_read`,
        which a compiled block (`Decoder(compile=True)`) does not trace."""
        if not self.filled:  # a prefill from an empty cache (positions 0..l-1) attends to its own keys
            if self.window is None and positions.numel() > self.capacity:
                raise ValueError(f"decode: the prompt ({positions.numel()} tokens) exceeds the static cache's "
                                 f"max_len ({self.capacity}); allocate a longer cache")
            keep = positions
            if self.window is not None:  # what later queries can see: the sinks and the last window
                keep = positions[(positions < self.n_sink) | (positions > positions[-1] - self.window)]
            self._write(k[:, :, keep], v[:, :, keep], keep)
            self.filled = True
            return attention(q, k, v, positions, positions, window, n_sink)
        return self._write_read(q, k, v, positions, window, n_sink)

    @torch.compiler.disable
    def _write_read(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, window: int | None,
                    n_sink: int) -> Tensor:
        """A decode step's write, then its attention over the first `span` slots: K [C, b, kv, c, dq],
        V [C, b, kv, c, dv] and their positions [span]. Never traced by the compiled block: the read's
        shapes follow `span` (one recompilation of the block per span otherwise; `decode_fn` may be
        compiled on its own), and Inductor made the in-place write through the cache's permuted view
        a copy of the whole cache (two per layer and step, ~5 us each at 2K on the H200)."""
        self.write_fn(self, k, v, positions)
        n = self.span // self.chunk
        return self.decode_fn(q, self.k[:n], self.v[:n], positions, self.pos[:self.span], window, n_sink)

    def _write(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        slots = self.slot(positions)
        index = (slots // self.chunk, slots % self.chunk)
        for cache, new in ((self.k, k), (self.v, v)):  # [C, c, b, kv, d] views, indexed by (chunk, offset)
            cache.permute(0, 3, 1, 2, 4).index_put_(index, new.permute(2, 0, 1, 3).to(cache.dtype))
        self.pos.index_copy_(0, slots, positions)

    def used_bytes(self) -> int:
        """Bytes of K and V in occupied slots (measured from the slots' positions)."""
        used = int((self.pos != EMPTY).sum())
        per_slot = sum(t[0, :, :, 0].numel() * t.element_size() for t in (self.k, self.v))
        return used * per_slot

    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class SSMState:
    """Mamba2's conv state [b, conv_dim, d_conv-1] and SSM state [b, h, p, n] in fixed buffers,
    behind the two mapping operations `Mamba2.forward` uses on its dict state: `get` answers None
    until the state is first written (so a prefill runs the stateless fast kernels), assignment
    copies into the buffer (its address never changes)."""

    def __init__(self, batch: int, conv_dim: int, d_conv: int, heads: int, head_dim: int, d_state: int,
                 dtype: torch.dtype, device: torch.device):
        state_dtype = wide_dtype(dtype)  # the SSM state accumulates: fp32 (fp64 in fp64 runs)
        self.buffers = {"conv": torch.zeros(batch, conv_dim, d_conv - 1, dtype=dtype, device=device),
                        "ssm": torch.zeros(batch, heads, head_dim, d_state, dtype=state_dtype, device=device)}
        self.filled = False
        self.packed: Tensor | None = None  # the layer's input projections in one tensor, set by the Decoder
        self.packed_conv: tuple[Tensor, Tensor] | None = None  # its x, B, C convs as one (weight, bias)

    def get(self, name: str) -> Tensor | None:
        return self.buffers[name] if self.filled else None

    def __setitem__(self, name: str, value: Tensor) -> None:
        if value is not self.buffers[name]:  # a kernel may have updated the buffer in place
            self.buffers[name].copy_(value)
        self.filled = True

    def used_bytes(self) -> int:
        return self.allocated_bytes() if self.filled else 0

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


class StaticCache:
    """Every layer's static state for `batch` sequences of up to `max_len` tokens, in `dtype` (the
    activations' dtype: K/V and conv states are stored as computed), global K/V in chunks of
    `chunk` slots. Used through `Decoder`."""

    def __init__(self, model, batch: int, max_len: int, dtype: torch.dtype, device: torch.device, chunk: int = 256):
        cfg, ic = model.config, model.config.intra
        self.max_len, self.length = max_len, 0
        self.gate_up: list[Tensor | None] = [None] * len(cfg.blocks)  # per block, set by `pack_weights`

        def kv(heads: int, qk: int, vd: int, window: int | None = None) -> StaticKV:
            return StaticKV(batch, heads, qk, vd, max_len, window, cfg.n_sink if window else 0, dtype, device, chunk)

        def ssm(heads: int, head_dim: int, d_state: int) -> SSMState:
            conv_dim = heads * head_dim + 2 * cfg.n_groups * d_state
            return SSMState(batch, conv_dim, cfg.d_conv, heads, head_dim, d_state, dtype, device)

        self.layers: list = []
        for sym in cfg.blocks:
            if sym == "A":
                self.layers.append(kv(cfg.n_kv_heads, cfg.head_dim, cfg.head_dim))
            elif sym == "S":
                self.layers.append(kv(cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, cfg.window))
            elif sym == "M":
                self.layers.append(ssm(cfg.ssm_heads, cfg.ssm_head_dim, cfg.d_state))
            else:  # intra-hybrid: the mixer looks its branches up by name
                self.layers.append({"attn": kv(ic.kv_heads, ic.qk_head_dim, ic.head_dim),
                                    "ssm": ssm(ic.ssm_heads, ic.head_dim, ic.d_state)})

    def pack_weights(self, model) -> None:
        """Keep each mixer's input projections (Q, K, V; Mamba2's z, x, B, C, dt) concatenated in
        its layer state: a decode step then runs one GEMV per mixer, not three to five. Mamba2's
        three convs likewise, so a step does not concatenate their weights again (two kernels per
        layer and step); and each SwiGLU's gate and up weights (`gate_up`: one GEMV of twice the
        width, ~3 us a layer less at 1B on the H200). A snapshot of the weights (and a copy of them
        in memory: ~1 GiB of gate/up at the 1B llama in bf16), taken by `Decoder.prefill`: the
        caches it fills hold keys and states of those same weights. The copies are plain tensors: a
        float8-converted linear decodes from its high-precision weights."""
        self.gate_up = [torch.cat([block.ffn.w1.weight, block.ffn.w3.weight]).detach()
                        if isinstance(block.ffn, SwiGLU) else None for block in model.blocks.values()]
        for key, block in model.blocks.items():
            layer, mixer = self.layers[int(key)], block.mixer
            pairs = [(layer, mixer)]
            if isinstance(layer, dict):  # intra-hybrid: both branches
                pairs = [(layer["attn"], mixer.attn), (layer["ssm"], mixer.ssm)]
            for state, m in pairs:
                state.packed = torch.cat([p.weight.detach() for p in m.projections()])
                if isinstance(state, SSMState):
                    state.packed_conv = tuple(t.detach() for t in m.conv_weights())

    def states(self) -> list[StaticKV | SSMState]:
        return [s for layer in self.layers for s in (layer.values() if isinstance(layer, dict) else [layer])]

    def set_span(self, span: int) -> None:
        """Global-attention slots the next decode steps attend to (>= the length after the step)."""
        for s in self.states():
            if isinstance(s, StaticKV) and s.window is None:
                s.span = span

    def recurrent(self) -> list[Tensor]:
        """The buffers a step updates from their own value (SSM and conv states); K/V writes are
        idempotent (a replayed step rewrites the same slot)."""
        return [t for s in self.states() if isinstance(s, SSMState) for t in s.buffers.values()]

    def used_bytes(self) -> int:
        """Bytes of state held for the tokens seen (slot positions of K/V are not counted)."""
        return sum(s.used_bytes() for s in self.states())

    def allocated_bytes(self) -> int:
        return sum(s.allocated_bytes() for s in self.states())

    def pretend_length(self, length: int) -> None:
        """Mark the slots of positions < `length` as occupied without writing them: a decode step
        then costs what it costs at that context (its work does not depend on the values). For
        benchmarks that time steps at long contexts without decoding up to them."""
        if length > self.max_len:
            raise ValueError(f"decode: length {length} exceeds the static cache's max_len {self.max_len}")
        positions = torch.arange(length)
        for s in self.states():
            if isinstance(s, StaticKV):
                keep = positions
                if s.window is not None:
                    keep = positions[(positions < s.n_sink) | (positions > length - 1 - s.window)]
                keep = keep.to(s.pos.device)
                s.pos.index_copy_(0, s.slot(keep), keep)
            s.filled = True
        self.length = length
