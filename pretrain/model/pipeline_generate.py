"""Generation on a pipelined model: every pp rank holds its stages' blocks and their caches; the
prefill and each decoding step go stage to stage (`Pipeline.through`, point-to-point sends of the
hidden states, several stages per rank included: interleaved and V layouts), the last stage picks
the next token and broadcasts it, so every pp rank returns the same tokens.

Why not torch's schedules: one token at a time is a chain of dependent single-microbatch
forwards, which a schedule cannot overlap; in torch 2.13 the V schedules' `eval` also asks for
backward buffers. The caches are the reference `InferenceCache` (one per local stage: each
counts the tokens it has seen), not the static decoder, which needs the embedding and head on
one device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from parallel.pipeline import Pipeline
from pretrain.model.lm import InferenceCache, decode_loop
from pretrain.model.packed import PackedDocs
from pretrain.model.sampling import sample


@torch.no_grad()
def generate_pipelined(pipeline: Pipeline, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                       top_k: int | None = None, generator: torch.Generator | None = None,
                       return_logits: bool = False,
                       doc_starts: Tensor | None = None,
                       stop: Callable[[Tensor], bool] | None = None,
                       eos_id: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """`HybridLM.generate` over `pipeline`'s stages (HybridLM stages): every pp rank calls it with
    the same arguments and gets the same result. Sampling draws from `generator` on the last
    stage's rank only."""
    n_layers = pipeline.modules[0].config.n_layers
    caches = {s: InferenceCache(n_layers) for s in pipeline.stage_ids}
    docs = PackedDocs.from_starts(doc_starts) if doc_starts is not None else None
    last = pipeline.n_stages - 1

    def run(tokens: Tensor) -> Tensor | None:
        """`tokens` through every stage; each stage is told the positions (under tensor
        parallelism a later stage's input is a sequence shard, which does not say its length)."""
        start, n = caches[pipeline.stage_ids[0]].length, tokens.shape[1]
        positions = docs if docs is not None else torch.arange(start, start + n, device=tokens.device)

        def stage(module: nn.Module, s: int, x: Tensor) -> Tensor:
            out = module(x, caches[s], positions)
            return out[:, -1] if s == last else out  # the last stage: logits of the next token

        return pipeline.through(stage, tokens)

    def step(token: Tensor) -> Tensor | None:
        nonlocal docs
        docs = docs.next_token() if docs is not None else None
        return run(token)

    def pick(logits: Tensor | None) -> Tensor:
        token = sample(logits, temperature, top_k, generator) if logits is not None else None
        return pipeline.broadcast_from_last(token)

    tokens, chosen = decode_loop(run, step, prompt, max_new_tokens, pick, stop, eos_id)
    if not return_logits:
        return tokens
    return tokens, pipeline.broadcast_from_last(torch.stack(chosen, dim=1) if pipeline.has_last else None)
