"""Document masking's cost on the GPU: 1B training-step tokens/s with masking off and on.

    python -m data_pipeline.demo_corpus --out data/demo
    PYTHONPATH=. python benchmarks/document_masking.py --data data/demo [--archs llama,mamba2,intra_hybrid]

The setup of benchmarks/gpu_model.py (paper 1B dims, sequence 8192, batch 2, bf16 autocast, fused
AdamW, eager; median of 6 steps after 3 warm-up steps), with the tokens and document starts of the
first training windows of a prepared corpus (the demo corpus: Python sources, a few documents per
8K window). Masking on: FlexAttention with a document block mask (built once per batch and mask,
inside the timed step), Mamba2 conv and Triton SSD with seq_idx. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import cuda_time  # noqa: E402

from data_pipeline.loader import build_train_loader  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.model.packed import PackedDocs  # noqa: E402


def step_throughput(arch: str, tokens: torch.Tensor, starts: torch.Tensor | None) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, "1b", device="cuda", vocab_size=max(128_256, int(tokens.max()) + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    torch.cuda.reset_peak_memory_stats()

    def step():
        docs = PackedDocs.from_starts(starts[:, :-1]) if starts is not None else None  # per batch, as in training
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:], docs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = cuda_time(step, warmup=3, iters=6)
    return {"step_ms": ms, "tokens_per_s": tokens[:, 1:].numel() / (ms / 1e3),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared data directory (e.g. the demo corpus)")
    ap.add_argument("--archs", default="llama,mamba2,intra_hybrid")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--out", default="document_masking.json")
    args = ap.parse_args()
    batch = next(iter(build_train_loader([(args.data, 1.0)], args.seq, args.batch, num_streams=args.batch,
                                         emit_doc_boundaries=True)))
    tokens, starts = batch["tokens"].cuda(), batch["doc_starts"].cuda()
    docs_per_row = (starts[:, :-1].sum(1) + (~starts[:, 0])).tolist()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "data": args.data,
               "documents_per_row": docs_per_row, "train": []}
    for arch in args.archs.split(","):
        row = {"arch": arch}
        for name, s in (("off", None), ("on", starts)):
            try:
                row[name] = step_throughput(arch, tokens, s)
            except torch.OutOfMemoryError as e:
                row[name] = {"error": f"OOM: {e}".splitlines()[0]}
            torch.cuda.empty_cache()
        if "error" not in row["off"] and "error" not in row["on"]:
            row["on_vs_off"] = row["on"]["tokens_per_s"] / row["off"]["tokens_per_s"]
        results["train"].append(row)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"documents per {args.seq}-token row: {docs_per_row}")
    print(f"{'arch':<14}{'off tok/s':>12}{'on tok/s':>12}{'on/off':>8}")
    for r in results["train"]:
        off, on = r["off"].get("tokens_per_s", float("nan")), r["on"].get("tokens_per_s", float("nan"))
        print(f"{r['arch']:<14}{off:>12,.0f}{on:>12,.0f}{r.get('on_vs_off', float('nan')):>8.3f}")


if __name__ == "__main__":
    main()
