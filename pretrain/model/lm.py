"""HybridLM: embedding -> blocks (from the layer pattern) -> final norm -> tied head."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        with torch.random.fork_rng(devices=[]):  # constructors' default inits must not move the RNG
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg, sym, i) for i, sym in enumerate(cfg.blocks))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tp_mesh: DeviceMesh | None = None  # set by parallelize_hybrid under tensor parallelism
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def head_weight(self) -> Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter from torch's current RNG, in module order, so a model
        built on the meta device and materialised with `to_empty` starts like an eager one."""
        for _, init in self.init_plan():
            init()

    def init_plan(self) -> list[tuple[nn.Module, Callable[[], None]]]:
        """The initialisation as ordered (module, init) steps. The order fixes what each module
        draws from the RNG; a step touches only its module, so a sharded model can be
        materialised one full module at a time (`parallel.init.init_sharded`). The steps look
        parameters up when run, not when planned (`to_empty` replaces them)."""
        std = self.config.init_std
        plan: list[tuple[nn.Module, Callable[[], None]]] = [
            (self.embed, lambda: nn.init.normal_(self.embed.weight, std=std))]
        if self.head is not None:
            plan.append((self.head, lambda: nn.init.normal_(self.head.weight, std=std)))
        for block in self.blocks:
            plan += [(m, m.reset_parameters) for m in (block.mixer_norm, block.mixer, block.ffn_norm, block.ffn)]
        plan.append((self.norm, self.norm.reset_parameters))
        return plan

    def hidden_states(self, tokens: Tensor, cache: InferenceCache | None = None,
                      positions: Tensor | PackedDocs | None = None) -> Tensor:
        """Final-norm hidden states. `positions` [l]: the tokens' absolute positions, given under
        context parallelism (a rank's shard of the sequence); default 0.. (or after the cache).
        PackedDocs instead: rows of packed documents, each token seeing only its own document."""
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.norm(x)

    def forward(self, tokens: Tensor, cache: InferenceCache | None = None,
                positions: Tensor | PackedDocs | None = None) -> Tensor:
        """tokens [b, l] -> logits [b, l, vocab]. Use `loss` for training (never full fp32 logits)."""
        h = self.hidden_states(tokens, cache, positions)
        if self.tp_mesh is None:
            return h @ self.head_weight.t()
        logits = gather_sequence(h) @ local(self.head_weight).t()  # this rank's vocabulary slice
        return DTensor.from_local(logits, self.tp_mesh, [Shard(2)], run_check=False).full_tensor()

    def loss(self, tokens: Tensor, targets: Tensor, positions: Tensor | PackedDocs | None = None) -> Tensor:
        """Mean next-token cross-entropy (+ MoE auxiliary losses when enabled). Under tensor
        parallelism the head is vocabulary-parallel and the loss too (no rank holds all logits);
        under context parallelism tokens/targets/positions (or PackedDocs) are this rank's shard."""
        h = self.hidden_states(tokens, positions=positions)
        if self.tp_mesh is None:
            loss = chunked_cross_entropy(h, self.head_weight, targets)
        else:
            weight = local(self.head_weight)
            loss = chunked_cross_entropy(gather_sequence(h), weight, targets, group=self.tp_mesh.get_group(),
                                         vocab_start=self.tp_mesh.get_local_rank() * weight.shape[0])
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                loss = loss + moe.aux_loss
        return loss

    def moe_layers(self) -> Iterator[MoE]:
        return (m for m in self.modules() if isinstance(m, MoE))

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False, static_cache: bool = True,
                 doc_starts: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Prefill the prompt once, then decode one token at a time from the KV / SSM caches.

        temperature 0 is greedy. With `return_logits`, also returns the logits that chose each
        new token [b, max_new_tokens, vocab]. `static_cache` decodes from preallocated caches with
        a shape-static step (`pretrain.model.decode.Decoder`, a CUDA graph on GPU from 32 new
        tokens on); False grows an `InferenceCache` (the reference; tensor parallelism uses it).
        `doc_starts` [b, l] (bool, True at each document's first token): rows of several packed
        documents, each row continuing its last document as if it had been prompted alone (on
        the growing cache).
        """
        docs = PackedDocs.from_starts(doc_starts) if doc_starts is not None else None
        if static_cache and self.tp_mesh is None and docs is None:
            from pretrain.model.decode import Decoder  # decode imports this module's neighbours

            decoder = Decoder(self, prompt.shape[0], prompt.shape[1] + max_new_tokens,
                              cuda_graph=prompt.is_cuda and max_new_tokens >= 32)
            first, step = decoder.prefill, decoder.step
        else:
            cache = InferenceCache(len(self.blocks))

            def first(tokens: Tensor) -> Tensor:
                return self(tokens, cache, docs)[:, -1]

            def step(token: Tensor) -> Tensor:
                nonlocal docs
                docs = docs.next_token() if docs is not None else None
                return self(token, cache, docs)[:, -1]
        logits = first(prompt)
        out, chosen = [prompt], []
        for i in range(max_new_tokens):
            chosen.append(logits)
            out.append(sample(logits, temperature, top_k, generator))
            if i + 1 < max_new_tokens:
                logits = step(out[-1])
        tokens = torch.cat(out, dim=1)
        return (tokens, torch.stack(chosen, dim=1)) if return_logits else tokens


class InferenceCache:
    """Per-layer decoding state (KV for attention, conv + SSM for Mamba2) and the tokens seen.
    `numel` counts the state's elements (not the int64 key positions / document ids kept for masking)."""

    def __init__(self, n_layers: int):
        self.layers: list[dict] = [{} for _ in range(n_layers)]
        self.length = 0

    def numel(self) -> int:
        def size(obj) -> int:
            if isinstance(obj, Tensor):
                return obj.numel()
            return sum(size(v) for k, v in obj.items() if k not in ("pos", "doc")) if isinstance(obj, dict) else 0
        return sum(size(layer) for layer in self.layers)


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token [b, 1] from last-position logits [b, vocab]."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
