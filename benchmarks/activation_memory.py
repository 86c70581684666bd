"""Calibration of the dry run's activation estimate (`pretrain.layout`) against measured peaks.

    python benchmarks/activation_memory.py [--out activation_memory.json] [--archs llama,mamba2]

One GPU, paper 1B presets, bf16 autocast over fp32 weights. For each architecture, micro-batch and
sequence length, with and without activation checkpointing: one warm-up step leaves the gradients
allocated, then the peak of a forward + backward above the memory held before it is what the step
costs beyond the fp32 states. The estimate set beside it is what the dry run adds per rank
(activations, the loss's working set) plus the bf16 weight copies autocast holds here (what FSDP's
"gathered" line is under sharding): every weight autocast casts stays in its cache for the forward;
the grouped experts' weights are cast inside the MoE, uncached, so under activation checkpointing
they are freed block by block. The table prints the two and their ratio.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model, run as a script or imported by path
from gpu_model import record_row, require_cuda  # noqa: E402

from parallel.activation_checkpoint import apply_activation_checkpointing
from pretrain.layout import activation_bytes_per_token_per_dim, loss_working_set_bytes
from pretrain.model import build_model
from pretrain.model.moe import GroupedExperts

GIB = 2**30
SHAPES = [(1, 4096), (1, 8192), (2, 8192), (1, 16384)]


def estimate_bytes(model, tokens: int, checkpointing: bool) -> tuple[int, int]:
    """The dry run's estimate as (activations, the rest): the rest is the loss working set plus the
    bf16 weight copies autocast holds, which do not grow with the tokens."""
    cfg = model.config
    experts = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    untied_embedding = 0 if cfg.tie_embeddings else model.embed.weight.numel()  # looked up, never cast
    cast = sum(p.numel() for p in model.parameters()) - untied_embedding - (experts if checkpointing else 0)
    return (activation_bytes_per_token_per_dim(cfg.blocks, checkpointing) * tokens * cfg.d_model,
            loss_working_set_bytes(cfg.vocab_size, cfg.d_model) + 2 * cast)


def measure(arch: str, micro_batch: int, seq: int, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, "1b", device="cuda")
    if checkpointing:
        apply_activation_checkpointing(model.blocks)
    tokens = torch.randint(0, model.config.vocab_size, (micro_batch, seq + 1), device="cuda")

    def forward_backward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    forward_backward()  # gradients stay allocated from here on
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    activations, rest = estimate_bytes(model, micro_batch * seq, checkpointing)
    estimate, token_dims = activations + rest, micro_batch * seq * model.config.d_model
    return {"arch": arch, "micro_batch": micro_batch, "seq": seq, "checkpointing": checkpointing,
            "measured_gib": measured / GIB, "estimate_gib": estimate / GIB, "ratio": estimate / measured,
            # the peak less the estimate's fixed part, per token per d_model: what the fitted coefficient
            # (`activation_bytes_per_token_per_dim`) stands for
            "measured_activation_bytes_per_token_per_dim": (measured - rest) / token_dims,
            "estimated_activation_bytes_per_token_per_dim": activations / token_dims}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="activation_memory.json")
    ap.add_argument("--archs", default="llama,mamba2,intra_hybrid,hybrid_moe")
    args = ap.parse_args()
    require_cuda("activation_memory.py", "it measures peaks of GPU memory")
    rows = []
    for arch in args.archs.split(","):
        for checkpointing in (False, True):
            for micro_batch, seq in SHAPES:
                record_row(rows, args.out, arch, lambda: measure(arch, micro_batch, seq, checkpointing),
                           micro_batch=micro_batch, seq=seq, checkpointing=checkpointing)
    print(f"{'arch':<14}{'ckpt':>5}{'mb':>4}{'seq':>7}{'measured GiB':>14}{'estimate GiB':>14}{'est/meas':>10}")
    for r in rows:
        head = f"{r['arch']:<14}{'yes' if r['checkpointing'] else 'no':>5}{r['micro_batch']:>4}{r['seq']:>7}"
        print(head + (f"  {r['error']}" if "error" in r else
                      f"{r['measured_gib']:>14.2f}{r['estimate_gib']:>14.2f}{r['ratio']:>10.2f}"))


if __name__ == "__main__":
    main()
