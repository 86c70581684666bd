"""HybridLM: embedding -> blocks (from the layer pattern) -> final norm -> head (tied or not).

A pipeline stage is a HybridLM holding only some blocks, keyed by their global layer id, so
parameter names - and checkpoints - are the same whatever the stage split: the embedding sits on
the first stage, the final norm, head and loss on the last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from parallel.tensor_parallel import gather_sequence, local
from pretrain.model.block import Block
from pretrain.model.config import ModelConfig
from pretrain.model.moe import MoE
from pretrain.model.norms import RMSNorm
from pretrain.model.ops import chunked_cross_entropy
from pretrain.model.packed import PackedDocs
from pretrain.model.sampling import check_sampling, greedy_tokens, sample
from pretrain.model.shared_dict import SharedDict

if TYPE_CHECKING:
    from parallel.pipeline import Pipeline

STOP_EVERY = 16  # new tokens between generate's `stop` checks


class LMHead(nn.Module):
    """The projection to vocabulary logits and the loss. Tied, it holds no weight of its own and
    reads the embedding's at call time (whatever tensor parallelism or FSDP made of it), so a
    checkpoint holds the tied weight once, as `embed.weight`. Under tensor parallelism the weight
    is vocabulary-sharded (the tied one by the embedding's own vocabulary-parallel plan) and the
    loss is vocabulary-parallel: no rank holds all logits."""

    def __init__(self, d_model: int, vocab_size: int, tied_to: nn.Embedding | None = None):
        super().__init__()
        self._tied_to = (tied_to,) if tied_to is not None else ()  # a tuple: not a submodule
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.tp_mesh: DeviceMesh | None = None  # set by parallelize_hybrid under tensor parallelism

    @property
    def tied(self) -> bool:
        return bool(self._tied_to)

    def projection(self) -> Tensor:
        return self._tied_to[0].weight if self.tied else self.weight

    def forward(self, h: Tensor) -> Tensor:
        """Final hidden states [b, l, d] -> full logits [b, l, vocab]."""
        if self.tp_mesh is None:
            return h @ self.projection().t()
        logits = gather_sequence(h) @ local(self.projection()).t()  # this rank's vocabulary slice
        return DTensor.from_local(logits, self.tp_mesh, [Shard(2)], run_check=False).full_tensor()

    def loss(self, h: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy, in chunks (never full fp32 logits)."""
        if self.tp_mesh is None:
            return chunked_cross_entropy(h, self.projection(), targets)
        weight = local(self.projection())
        return chunked_cross_entropy(gather_sequence(h), weight, targets, group=self.tp_mesh.get_group(),
                                     vocab_start=self.tp_mesh.get_local_rank() * weight.shape[0])


class HybridLM(nn.Module):
    """The whole model, or one pipeline stage of it: `layers` (global block ids, default all),
    `first` (holds the embedding) and `last` (holds the final norm, head and loss)."""

    def __init__(self, cfg: ModelConfig, layers: Iterable[int] | None = None, first: bool = True, last: bool = True):
        super().__init__()
        self.config = cfg
        layers = range(cfg.n_layers) if layers is None else sorted(layers)
        if cfg.tie_embeddings and first != last:
            raise ValueError("model.tie_embeddings=true needs the embedding and the head in one pipeline stage: set "
                             "model.overrides.tie_embeddings=false to use parallel.pp > 1")
        with torch.random.fork_rng(devices=[]):  # constructors' default inits must not move the RNG
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model) if first else None
            self.blocks = nn.ModuleDict({str(i): Block(cfg, cfg.blocks[i], i) for i in layers})
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if last else None
            self.head = LMHead(cfg.d_model, cfg.vocab_size, self.embed if cfg.tie_embeddings else None) if last else None
        self.tp_mesh: DeviceMesh | None = None  # set by parallelize_hybrid under tensor parallelism
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def stage(self, layers: Iterable[int], first: bool, last: bool) -> HybridLM:
        """A pipeline stage made of this model's own modules (shared, not copied): this rank's
        stages can then be checkpointed, optimised and clipped as one model with global names."""
        view = HybridLM.__new__(HybridLM)
        nn.Module.__init__(view)
        view.config, view.tp_mesh = self.config, self.tp_mesh
        view.embed = self.embed if first else None
        view.blocks = nn.ModuleDict({str(i): self.blocks[str(i)] for i in layers})
        view.norm, view.head = (self.norm, self.head) if last else (None, None)
        return view

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter from torch's current RNG, in module order, so a model
        built on the meta device and materialised with `to_empty` starts like an eager one."""
        for module, init in self.init_plan():
            if module is not None:
                init()

    def init_plan(self) -> list[tuple[nn.Module | None, Callable[[], None]]]:
        """The initialisation as ordered (module, init) steps - those of the whole model, in
        its order, with module None where a pipeline stage lacks the module: every stage draws
        the RNG as the whole model does and keeps its own part. A step touches only its module,
        so a sharded model can be materialised one full module at a time
        (`parallel.init.init_sharded`). The steps look parameters up when run, not when planned
        (`to_empty` replaces them)."""
        cfg, std = self.config, self.config.init_std
        plan: list[tuple[nn.Module | None, Callable[[], None]]] = [
            (self.embed, lambda: nn.init.normal_(self.embed.weight, std=std))]
        if not cfg.tie_embeddings:
            plan.append((self.head, lambda: nn.init.normal_(self.head.weight, std=std)))
        for i in range(cfg.n_layers):
            block = self.blocks[str(i)] if str(i) in self.blocks else None
            parts = ("mixer_norm", "mixer", "ffn_norm", "ffn")
            plan += [(getattr(block, name), getattr(block, name).reset_parameters) if block is not None else (None, _noop)
                     for name in parts]
        plan.append((self.norm, self.norm.reset_parameters if self.norm is not None else _noop))
        return plan

    def hidden_states(self, tokens: Tensor, cache: InferenceCache | None = None,
                      positions: Tensor | PackedDocs | None = None) -> Tensor:
        """Final-norm hidden states (a later pipeline stage: takes the previous stage's hidden
        states for `tokens`; an earlier one returns its last block's output, plain under tensor
        parallelism so that it can cross to the next stage). `positions` [l] (or [b, l], rows
        equal, as a pipeline schedule splits every input on the batch): the tokens' absolute
        positions, given under context parallelism (a rank's shard of the sequence); default 0..
        (or after the cache). PackedDocs instead: rows of packed documents, each token seeing only
        its own document. A later stage under tensor parallelism needs them (its input is a
        sequence shard, maybe uneven: one decoded token over tp ranks)."""
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        elif isinstance(positions, Tensor) and positions.ndim == 2:
            positions = positions[0]
        length = positions.shape[-1] if isinstance(positions, Tensor) else positions.positions.shape[-1]
        if self.embed is not None:
            x = self.embed(tokens)
        elif self.tp_mesh is not None:  # the previous stage's sequence shard
            b, _, d = tokens.shape
            x = DTensor.from_local(tokens, self.tp_mesh, [Shard(1)], run_check=False, shape=(b, length, d),
                                   stride=(length * d, d, 1))
        else:
            x = tokens
        for key, block in self.blocks.items():
            x = block(x, positions, cache.layers[int(key)] if cache is not None else None)
        if cache is not None:
            cache.length += length
        if self.norm is None:
            return local(x)
        return self.norm(x)

    def forward(self, tokens: Tensor, cache: InferenceCache | None = None,
                positions: Tensor | PackedDocs | None = None, *, targets: Tensor | None = None,
                doc: Tensor | None = None) -> Tensor:
        """tokens [b, l] -> logits [b, l, vocab], or with `targets` the loss (`loss`). A pipeline
        stage without the head returns its hidden states (the next stage's input). `doc` [b, l]
        with `positions` [b, l]: PackedDocs given as its two tensors, as a pipeline schedule
        passes it (it splits tensor inputs on the batch and sends each stage its microbatch's)."""
        if doc is not None:
            positions = PackedDocs(positions, doc)
        h = self.hidden_states(tokens, cache, positions)
        if self.head is None:
            return h
        return self.head(h) if targets is None else self._loss(h, targets)

    def loss(self, tokens: Tensor, targets: Tensor, positions: Tensor | PackedDocs | None = None) -> Tensor:
        """Mean next-token cross-entropy (+ MoE auxiliary losses when enabled). Under tensor
        parallelism the head is vocabulary-parallel and the loss too (no rank holds all logits);
        under context parallelism tokens/targets/positions (or PackedDocs) are this rank's shard."""
        return self(tokens, positions=positions, targets=targets)

    def _loss(self, h: Tensor, targets: Tensor) -> Tensor:
        aux = self.aux_loss()
        loss = self.head.loss(h, targets)
        return loss if aux is None else loss + aux

    def aux_loss(self) -> Tensor | None:
        """The sum of this model's (or stage's) MoE auxiliary losses of the last forward; None
        when there are none (aux-loss-free balancing, or not training)."""
        losses = [moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None]
        return sum(losses[1:], losses[0]) if losses else None

    def side_loss(self) -> Tensor | None:
        """What a pipeline stage adds to the objective besides its output (`parallel.pipeline`):
        a stage without the head its MoE auxiliary losses; the last stage none (its loss holds them)."""
        return self.aux_loss() if self.head is None else None

    def moe_layers(self) -> Iterator[MoE]:
        return (m for m in self.modules() if isinstance(m, MoE))

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False, static_cache: bool = True,
                 doc_starts: Tensor | None = None, pipeline: Pipeline | None = None,
                 stop: Callable[[Tensor], bool] | None = None,
                 eos_id: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Prefill the prompt once, then decode one token at a time from the KV / SSM caches.

        temperature 0 is greedy. With `return_logits`, also returns the logits each new token was
        picked from [b, new tokens, vocab] (an EOS row's padding EOS was not chosen by its logits).
        `static_cache` decodes from preallocated caches with a shape-static step
        (`pretrain.model.decode.Decoder`, a CUDA graph on GPU from 32 new tokens on); False grows
        an `InferenceCache` (the reference; tensor parallelism uses it).
        `doc_starts` [b, l] (bool, True at each document's first token): rows of several packed
        documents, each row continuing its last document as if it had been prompted alone (on
        the growing cache). Under pipeline parallelism `pipeline` is this rank's
        (`parallel.pipeline.Pipeline`, the trainer's `pipeline`) and every pp rank calls this
        with the same arguments (`pretrain.model.pipeline_generate`: growing caches). `stop`
        (the new tokens so far [b, n] -> whether to end) is asked every STOP_EVERY new tokens: a
        generation it ends returns fewer than max_new_tokens. Under pipeline parallelism every pp
        rank asks it of the same tokens, and it must answer alike on all of them. `eos_id` ends
        each row at its first EOS: the row's later tokens are EOS too (padding, as transformers'
        generate pads with its pad token), and generation ends at the first check (every
        STOP_EVERY new tokens) where every row has ended. Under tensor parallelism every tp rank
        samples for itself: at temperature > 0 give each a `generator` seeded alike, or the ranks'
        tokens differ (and with `eos_id` one rank may end while the others wait in a collective).
        """
        check_sampling(max_new_tokens, temperature, top_k, self.config.vocab_size, eos_id)
        if pipeline is not None:
            from pretrain.model.pipeline_generate import generate_pipelined

            return generate_pipelined(pipeline, prompt, max_new_tokens, temperature, top_k, generator, return_logits,
                                      doc_starts, stop, eos_id)
        if self.embed is None or self.head is None:
            raise ValueError("HybridLM.generate on a pipeline stage (parallel.pp > 1) needs its rank's pipeline: call "
                             "model.generate(prompt, ..., pipeline=trainer.pipeline) on every pp rank")
        docs = PackedDocs.from_starts(doc_starts) if doc_starts is not None else None

        def pick(logits: Tensor) -> Tensor:
            return sample(logits, temperature, top_k, generator)

        if static_cache and self.tp_mesh is None and docs is None:
            from pretrain.model.decode import Decoder  # decode imports this module's neighbours

            decoder = Decoder(self, prompt.shape[0], prompt.shape[1] + max_new_tokens,
                              cuda_graph=prompt.is_cuda and max_new_tokens >= 32)
            first, step = decoder.prefill, decoder.step
            if temperature <= 0 and not return_logits:  # the argmax inside the captured step
                first, step, pick = (lambda p: greedy_tokens(decoder.prefill(p))), decoder.greedy_step, _chosen
        else:
            cache = InferenceCache(self.config.n_layers)

            def first(tokens: Tensor) -> Tensor:
                return self(tokens, cache, docs)[:, -1]

            def step(token: Tensor) -> Tensor:
                nonlocal docs
                docs = docs.next_token() if docs is not None else None
                return self(token, cache, docs)[:, -1]
        tokens, chosen = decode_loop(first, step, prompt, max_new_tokens, pick, stop, eos_id)
        return (tokens, torch.stack(chosen, dim=1)) if return_logits else tokens


def decode_loop(first: Callable[[Tensor], Tensor | None], step: Callable[[Tensor], Tensor | None], prompt: Tensor,
                max_new_tokens: int, pick: Callable[[Tensor | None], Tensor],
                stop: Callable[[Tensor], bool] | None = None,
                eos_id: int | None = None) -> tuple[Tensor, list[Tensor | None]]:
    """Generation's loop: `first` prefills the prompt and `step` appends a token [b, 1], each
    returning the next token's logits [b, vocab] (None where another pipeline rank holds them; the
    token itself where the step chose it); `pick` turns those into the next token. A row that has
    picked `eos_id` gets EOS from then on. Every STOP_EVERY tokens (not every token: looking reads
    back to the host, which waits for the GPU) the loop ends if every row has ended or `stop` says
    so. Returns the prompt followed by the new tokens, and what `pick` chose each from."""
    logits = first(prompt)
    out, chosen = [prompt], []
    ended = None if eos_id is None else torch.zeros_like(prompt[:, :1], dtype=torch.bool)
    for i in range(max_new_tokens):
        chosen.append(logits)
        token = pick(logits)
        if ended is not None:
            token = token.masked_fill(ended, eos_id)
            ended = ended | (token == eos_id)
        out.append(token)
        if (i + 1) % STOP_EVERY == 0 and ((ended is not None and bool(ended.all()))
                                          or (stop is not None and stop(torch.cat(out[1:], dim=1)))):
            break
        if i + 1 < max_new_tokens:
            logits = step(out[-1])
    return torch.cat(out, dim=1), chosen


def _chosen(token: Tensor) -> Tensor:
    """`decode_loop`'s pick where the step has chosen the token."""
    return token


def _noop() -> None:
    """The init step of a module a pipeline stage does not hold."""


class InferenceCache:
    """Per-layer decoding state (KV for attention, conv + SSM for Mamba2) and the tokens seen.
    `numel` counts the state's elements (not the int64 key positions / document ids kept for masking)."""

    def __init__(self, n_layers: int):
        self.layers: list[LayerState] = [LayerState() for _ in range(n_layers)]
        self.length = 0

    def numel(self) -> int:
        def size(obj) -> int:
            if isinstance(obj, Tensor):
                return obj.numel()
            if isinstance(obj, Mapping):
                return sum(size(v) for k, v in obj.items() if k not in ("pos", "doc"))
            return 0
        return sum(size(layer) for layer in self.layers)


class LayerState(SharedDict):
    """One layer's growing state, read and written by name by its mixer ("k", "v", "pos", "doc",
    "conv", "ssm"; an intra-hybrid block's "attn" and "ssm" branches); a `SharedDict`, so FSDP2's
    input cast does not copy it away from the mixer's writes."""
