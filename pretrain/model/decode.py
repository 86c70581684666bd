"""Static-cache decoding: one batched prefill, then a one-token step whose shapes never change, so
on CUDA it is captured once as a CUDA graph and replayed (no per-layer Python or launches, no
re-planning).

With `compile=True` every block of the one-token step runs through `torch.compile` (Inductor fuses
its norms, rotary, residuals, SwiGLU, conv and SSM update into a few kernels, the ~60 kernels per
layer of the eager step being the step's floor), and so do the embedding lookup and the head (with
the greedy choice for `greedy_step`: the next token chosen inside the step). The attention read
over the cache runs between the compiled parts, with the write of the new keys and values (`StaticKV._write_read`, never traced: its
shapes follow the span) on `attention`'s kernels: `triton` (the default on CUDA) our two
flash-decoding kernels (`decode_attention_triton`) after a one-launch write (`kv_write_triton`),
`split_k` (the default elsewhere) the split-K PyTorch `decode_attention` and `StaticKV._write` they
are tested against, `compiled` its products-and-sums form through its own compilation
(`compiled_decode_attention`: one for every span; on the H200 the compiled llama step with it ran
at 0.39-0.62x the eager step's tokens/s). Each is launched from Python between the compiled
blocks, so the CUDA graph captures the blocks' and the attention's kernels alike.

The step attends to the first `span` slots of each global KV cache, `span` rounded up to a
multiple of `span_step`: one graph per span in use and output (logits for `step`, tokens for
`greedy_step`; one per `span_step` of context, sharing one memory pool), instead of always reading the whole preallocated cache. Positions are tensors the graph
reads, never Python numbers baked into it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from pretrain.model.ops.decode_attention import compiled_decode_attention, decode_attention
from pretrain.model.ops.decode_attention_triton import decode_attention_triton, kv_write_triton
from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.library import has_triton
from pretrain.model.sampling import greedy_tokens
from pretrain.model.static_cache import StaticCache, StaticKV, chunk_of


def activation_dtype(model, device: torch.device) -> torch.dtype:
    """What the mixers compute K/V and conv inputs in: the autocast dtype, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.embed.weight.dtype


# a decode step's attention read over the cache and its write of the new keys and values
# (`Decoder(attention=...)`), whether the blocks are compiled or not
ATTENTION = {"triton": (decode_attention_triton, kv_write_triton),
             "split_k": (decode_attention, StaticKV._write),
             "compiled": (compiled_decode_attention, StaticKV._write)}


class Decoder:
    """Decode `batch` sequences of up to `max_len` tokens with `model` (a HybridLM, not tensor-
    parallel). `cuda_graph` None: on CUDA devices. `compile`: the step's blocks through torch.compile;
    `attention`: the kernels of the attention read and write (`ATTENTION`; None: `triton` on CUDA
    where Triton imports, outside `reference_kernels()` and for activations other than fp64, else
    `split_k`). Run under the same autocast as the prefill."""

    def __init__(self, model, batch: int, max_len: int, cuda_graph: bool | None = None, span_step: int = 1024,
                 compile: bool = False, attention: str | None = None):
        if model.tp_mesh is not None:
            raise ValueError("decode: the static decoder runs on one device; use generate(static_cache=False) "
                             "under tensor parallelism")
        if model.embed is None or model.head is None:
            raise ValueError("decode: the static decoder needs the whole model, not a pipeline stage (parallel.pp > 1); "
                             "use generate(..., pipeline=trainer.pipeline) on every pp rank")
        device = model.embed.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"decode: cuda_graph=True needs the model on a CUDA device (it is on {device})")
        if span_step < 1:
            raise ValueError(f"decode: span_step must be >= 1 (got {span_step})")
        self.dtype = activation_dtype(model, device)  # of the caches: K/V and conv states as computed
        if attention is None:  # the kernels' switch (`reference_kernels`) decides, as for every op
            fast = wants_fast_kernel(model.embed.weight) and has_triton() and self.dtype != torch.float64
            attention = "triton" if fast else "split_k"
        if attention == "triton" and (device.type != "cuda" or self.dtype == torch.float64):
            raise ValueError(f"decode: attention='triton' needs the model on a CUDA device and computes in fp32 (the "
                             f"model is on {device}, in {self.dtype}); use split_k")
        if attention not in ATTENTION:
            raise ValueError(f"decode: attention must be one of {', '.join(ATTENTION)} (got {attention!r})")
        self.model, self.span_step, self.attention, chunk = model, span_step, attention, chunk_of(span_step)
        self.cache = StaticCache(model, batch, max_len, self.dtype, device, chunk)
        self.capacity = -(-max_len // chunk) * chunk  # of the global caches: spans are whole chunks
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the graphs' inputs
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # by (span, greedy)
        self._pool = None
        self.graph_error: str | None = None  # why capture failed (the steps then run eagerly)
        # one compiled function for every block: Dynamo keeps an entry per block kind, not per layer
        self.compiled_input = torch.compile(_step_input, dynamic=False) if compile else None
        self.compiled_block = torch.compile(_run_block, dynamic=False) if compile else None
        self.compiled_output = torch.compile(_step_output, dynamic=False) if compile else None
        for s in self.cache.states():
            if isinstance(s, StaticKV):
                s.decode_fn, s.write_fn = ATTENTION[attention]

    def _step(self, tokens: Tensor, positions: Tensor, greedy: bool) -> Tensor:
        """A step's logits [b, vocab], or its greedy next tokens [b, 1]: hidden_states' loop for one
        token on one device, each block compiled when `compile`, with the packed FFN weights."""
        embed, run_block = self.compiled_input or _step_input, self.compiled_block or _run_block
        output = self.compiled_output or _step_output
        x = embed(self.model, tokens)
        for key, block in self.model.blocks.items():
            x = run_block(block, x, positions, self.cache.layers[int(key)], self.cache.gate_up[int(key)])
        return output(self.model, x, greedy)

    def prefill(self, prompt: Tensor) -> Tensor:
        """Fill the caches with the prompt [b, l] in one forward; logits of its last token [b, vocab]."""
        if self.cache.length:
            raise ValueError("decode: prefill runs once, on an empty cache")
        dtype = activation_dtype(self.model, prompt.device)
        if dtype != self.dtype:
            raise ValueError(f"decode: the caches were allocated for {self.dtype} activations and the prefill runs "
                             f"in {dtype}; build the Decoder under the prefill's autocast, after any dtype change")
        if prompt.shape[1] > self.cache.max_len:
            raise ValueError(f"decode: the prompt ({prompt.shape[1]} tokens) exceeds max_len {self.cache.max_len}")
        self.cache.pack_weights(self.model)  # the weights' values now (after any change since __init__)
        positions = torch.arange(prompt.shape[1], device=prompt.device)
        logits = self.model.head(self.model.hidden_states(prompt, self.cache, positions)[:, -1])
        self.cache.length = prompt.shape[1]
        return logits

    def span(self, length: int) -> int:
        return min(self.capacity, -(-length // self.span_step) * self.span_step)

    def step(self, tokens: Tensor) -> Tensor:
        """Append `tokens` [b, 1]; logits of the next token [b, vocab] (a fresh tensor)."""
        return self._advance(tokens, greedy=False)

    def greedy_step(self, tokens: Tensor) -> Tensor:
        """Append `tokens` [b, 1]; the greedy next tokens [b, 1] (a fresh tensor), chosen inside the
        step: after a captured step, a copy of b tokens instead of the logits and an argmax."""
        return self._advance(tokens, greedy=True)

    def _advance(self, tokens: Tensor, greedy: bool) -> Tensor:
        n = self.cache.length
        if n >= self.cache.max_len:
            raise ValueError(f"decode: the static cache is full (max_len {self.cache.max_len})")
        self.tokens.copy_(tokens)
        self.position.fill_(n)
        span = self.span(n + 1)
        captured = self.capture(span, greedy) if self.use_graph else None
        if captured is not None:
            captured[0].replay()
            out = captured[1].clone()  # the graph's own tensor: the next replay overwrites it
        else:
            self.cache.set_span(span)
            out = self._step(self.tokens, self.position, greedy)
        self.cache.length = n + 1
        return out

    def capture_until(self, length: int, greedy: bool) -> None:
        """Capture now the graphs that steps up to total `length` will use, of `greedy_step` or of
        `step` (keeps capture out of a timed loop)."""
        for span in sorted({self.span(n) for n in range(self.cache.length + 1, length + 1)}):
            if self.capture(span, greedy) is None:
                return

    def capture(self, span: int, greedy: bool) -> tuple[torch.cuda.CUDAGraph, Tensor] | None:
        """The graph of a step attending to `span` global slots (captured on first use) that returns
        tokens (`greedy`) or logits, or None when the step cannot be captured (an op that
        synchronises with the host, e.g. the MoE's bincount): then every step runs eagerly and
        `graph_error` says why. Every capture is preceded by one warm-up step on a side stream, as
        CUDA graphs need, and so that nothing compiles inside the capture (a compiled block's guard
        not met yet, e.g. a new span's length; a Triton kernel specialised on a new chunk count); it
        writes K/V at the current length's slot (the next step overwrites it) and the recurrent
        states are restored after it."""
        if (span, greedy) in self.graphs:
            return self.graphs[span, greedy]
        length = self.cache.length  # the Python forward counts the warm-up and captured tokens
        try:
            return self._capture(span, greedy)
        except RuntimeError as e:
            self.use_graph, self.graph_error = False, str(e).splitlines()[0]
            return None
        finally:
            self.cache.length = length

    def _capture(self, span: int, greedy: bool) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        self.cache.set_span(span)
        self.position.fill_(self.cache.length)
        with self._capture_autocast():
            saved = [t.clone() for t in self.cache.recurrent()]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(self.tokens, self.position, greedy)
            torch.cuda.current_stream().wait_stream(side)
            for t, s in zip(self.cache.recurrent(), saved):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._step(self.tokens, self.position, greedy)
        self._pool = self._pool or graph.pool()
        self.graphs[span, greedy] = (graph, out)
        return graph, out

    def _capture_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast's weight-cast cache must be off while capturing (its copies would be freed
        under the graph)."""
        if not torch.is_autocast_enabled("cuda"):
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _step_input(model, tokens: Tensor) -> Tensor:
    """A decode step's embedding lookup (compiled: a gather of b rows; eager, torch's index-select
    kernel for small indices took 5 us of a 1.25 ms step on the H200)."""
    return model.embed(tokens)


def _run_block(block, x: Tensor, positions: Tensor, state, gate_up: Tensor | None) -> Tensor:
    """One block of a decode step: the function `Decoder(compile=True)` compiles."""
    return block(x, positions, state, gate_up)


def _step_output(model, x: Tensor, greedy: bool) -> Tensor:
    """The final norm and the head of a decode step, [b, 1, d] -> logits [b, vocab], or with `greedy`
    only the choice: next tokens [b, 1]."""
    logits = model.head(model.norm(x)[:, -1])
    return greedy_tokens(logits) if greedy else logits
