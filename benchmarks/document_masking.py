"""Document masking's cost on the GPU: 1B training-step tokens/s with masking off and on.

    python -m data_pipeline.demo_corpus --out data/demo
    PYTHONPATH=. python benchmarks/document_masking.py --data data/demo [--archs llama,mamba2,intra_hybrid]

The setup of benchmarks/gpu_model.py (paper 1B dims, sequence 8192, batch 2, bf16 autocast, fused
AdamW, eager; median of 6 steps after 3 warm-up steps), each step on the next of the corpus's first
9 training batches (one batch says little: a window inside one long document needs no mask). Cases,
all on those tokens: `demo`, the corpus's own document starts; `docN` (--doc-len), starts drawn
with mean document length N (seeded), several documents per row, where block-sparse attention
skips work. Masking on is the trainer's path: a batch whose rows each lie in one document runs
unmasked (decided on the CPU starts); else FlexAttention with a document block mask (built per
batch, inside the timed step) and Mamba2 conv and SSD with seq_idx. Variant rows rerun one case
(--variant-case, default the last drawn one) of --variant-archs with other FlexAttention kernel
options (--flex-options), one row per set. Masking off is timed before and after an arch's masked
rows (the ratio uses their mean). First, the attention alone (fwd+bwd): SDPA causal against the
document FlexAttention per case and option set. Writes JSON, prints a table last. It takes minutes
on the H200: FlexAttention compiles once per option set and mamba-ssm autotunes, in untimed
warm-up steps.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import positive_ints, step_time_ms  # noqa: E402

from data_pipeline.errors import DataInputError  # noqa: E402
from data_pipeline.loader import build_train_loader  # noqa: E402
from pretrain.model import build_model, model_config  # noqa: E402
from pretrain.model.ops.library import has_causal_conv1d, has_mamba_ssd  # noqa: E402
from pretrain.model.packed import PackedDocs, masking_needed  # noqa: E402

# the module (`pretrain.model.ops.attention` as an attribute path is the re-exported function)
attention_ops = importlib.import_module("pretrain.model.ops.attention")

WARMUP, ITERS = 3, 6
# FlexAttention kernel option sets to compare with torch's default (see ops/attention.py's
# FLEX_KERNEL_OPTIONS): TMA loads on Hopper; smaller backward tiles with fewer warps.
VARIANTS = {
    "tma": {"USE_TMA": True},
    "bwd64w4": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                "bwd_num_warps": 4, "bwd_num_stages": 3},
}


def drawn_starts(shape: tuple[int, ...], mean_len: int, seed: int) -> torch.Tensor:
    """Document starts [..., L] with exponentially distributed document lengths of mean `mean_len`."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.zeros(shape, dtype=torch.bool)
    flat = starts.view(-1, shape[-1])
    for row in flat:
        pos = 0
        while pos < shape[-1]:
            row[pos] = True
            pos += max(1, int(torch.empty(()).exponential_(1 / mean_len, generator=gen)))
    return starts


def docs_per_row(starts: torch.Tensor) -> float:
    """Mean documents per row over the inputs' columns (a row's first token starts one)."""
    s = starts[..., :-1].clone()
    s[..., 0] = True
    return s.sum(-1).float().mean().item()


def step_throughput(model, opt, tokens: torch.Tensor, starts: torch.Tensor | None) -> dict:
    """tokens [n, b, L+1] on the device; starts [n, b, L+1] on the CPU (None: masking off). With
    starts, one untimed masked step first: the masked kernels compile (FlexAttention) and autotune
    (mamba-ssm) there even when the warm-up batches all take the fast path."""
    device, i, masked = tokens.device, 0, []

    def train_step(batch: torch.Tensor, docs: PackedDocs | None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.loss(batch[:, :-1], batch[:, 1:], docs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step() -> None:
        nonlocal i
        batch_starts = starts[i % len(tokens), :, :-1] if starts is not None else None
        use_mask = batch_starts is not None and masking_needed(batch_starts)  # as the trainer: on the CPU
        masked.append(use_mask)
        train_step(tokens[i % len(tokens)],
                   PackedDocs.from_starts(batch_starts.to(device, non_blocking=True)) if use_mask else None)
        i += 1

    if device.type == "cuda":  # this row's own peak (weights, moments and gradients carry over from earlier rows)
        torch.cuda.reset_peak_memory_stats()
    try:
        if starts is not None:
            train_step(tokens[0], PackedDocs.from_starts(starts[0, :, :-1].to(device)))
        ms = step_time_ms(step, device, warmup=WARMUP, iters=ITERS)
    finally:  # a failed row (OOM, a refused kernel option) leaves no gradients to the next
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_ms": ms, "tokens_per_s": tokens[0, :, 1:].numel() / (ms / 1e3),
            "masked_steps": f"{sum(masked[WARMUP:])}/{ITERS}", "peak_mem_gib": peak}


def measure(run: dict, name: str, fn) -> None:
    """run[name] = fn(), or the error (one line) when it fails."""
    try:
        run[name] = fn()
    except Exception as e:  # noqa: BLE001  (an OOM or a kernel option torch refuses: report, go on)
        run[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attention_rows(size: str, cases: dict[str, torch.Tensor], variants: dict[str, dict],
                   device: torch.device) -> list[dict]:
    """The attention alone (llama's heads, bf16, forward + backward, each case's first batch): SDPA
    causal (what masking off and the fast path run) against the document FlexAttention per kernel
    option set; tells how much of a step's on/off gap is the attention kernel."""
    cfg = model_config("llama", size)
    b, length = next(iter(cases.values())).shape[1], next(iter(cases.values())).shape[2] - 1
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, cfg.n_heads, length, cfg.head_dim, device=device, dtype=torch.bfloat16, generator=gen,
                    requires_grad=True)
    k, v = (torch.randn(b, cfg.n_kv_heads, length, cfg.head_dim, device=device, dtype=torch.bfloat16, generator=gen,
                        requires_grad=True) for _ in range(2))
    pos = torch.arange(length, device=device)

    def timed(fn) -> dict:
        def run():
            fn().sum().backward()
        return {"fwd_bwd_ms": step_time_ms(run, device, warmup=3, iters=10)}

    rows = [{"kernel": "sdpa causal", "case": "-"}]
    measure(rows[-1], "time", lambda: timed(lambda: attention_ops.attention(q, k, v, pos, pos)))
    for flex_name, options in ({"default": None} | variants).items():
        attention_ops.FLEX_KERNEL_OPTIONS = options
        try:
            for case, starts in cases.items():
                docs = PackedDocs.from_starts(starts[0, :, :-1].to(device))
                rows.append({"kernel": f"flex {flex_name}", "case": case})
                measure(rows[-1], "time", lambda: timed(lambda: attention_ops.document_attention(
                    q, k, v, docs.positions, docs.positions, docs.doc, docs.doc, None, 0, docs.kernel_cache)))
        finally:
            attention_ops.FLEX_KERNEL_OPTIONS = None
    return rows


def arch_rows(arch: str, size: str, tokens: torch.Tensor, cases: dict[str, torch.Tensor],
              variants: dict[str, dict], variant_case: str) -> list[dict]:
    """One arch's rows: every case with torch's kernel options, `variant_case` with each variant."""
    torch.manual_seed(0)
    model = build_model(arch, size, device=tokens.device, vocab_size=max(128_256, int(tokens.max()) + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    off: dict = {}  # timed before and after the masked rows; their mean is the reference
    measure(off, "before", lambda: step_throughput(model, opt, tokens, None))
    rows = []
    for flex_name, options in ({"default": None} | variants).items():
        attention_ops.FLEX_KERNEL_OPTIONS = options
        try:
            for case, starts in cases.items():
                if flex_name == "default" or case == variant_case:
                    rows.append({"arch": arch, "flex": flex_name, "case": case})
                    measure(rows[-1], "on", lambda: step_throughput(model, opt, tokens, starts))
        finally:
            attention_ops.FLEX_KERNEL_OPTIONS = None
    measure(off, "after", lambda: step_throughput(model, opt, tokens, None))
    runs = [r["tokens_per_s"] for r in off.values() if "tokens_per_s" in r]
    off["tokens_per_s"] = sum(runs) / len(runs) if runs else float("nan")
    for row in rows:
        row["off"] = off
        row["on_vs_off"] = row["on"].get("tokens_per_s", float("nan")) / off["tokens_per_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared data directory (e.g. the demo corpus)")
    ap.add_argument("--archs", default="llama,mamba2,intra_hybrid")
    ap.add_argument("--doc-len", type=lambda text: positive_ints(text) if text else [], default="1024,2048",
                    help="mean document lengths of the drawn-starts cases ('' for none)")
    ap.add_argument("--variant-archs", default="llama", help="archs rerun with each --flex-options set ('' for none)")
    ap.add_argument("--flex-options", default=",".join(VARIANTS), help=f"variant sets among {sorted(VARIANTS)}")
    ap.add_argument("--variant-case", default=None, help="the case the variants rerun (default: the last)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--size", default="1b", help="model size ('tiny' with a short --seq: a CPU smoke run)")
    ap.add_argument("--out", default="document_masking.json")
    args = ap.parse_args()
    unknown = [v for v in args.flex_options.split(",") if v and v not in VARIANTS]
    if unknown:
        ap.error(f"--flex-options: {','.join(unknown)} not among {','.join(sorted(VARIANTS))}")
    case_names = ["demo", *(f"doc{mean}" for mean in args.doc_len)]  # as built below
    if args.variant_case is not None and args.variant_case not in case_names:
        ap.error(f"--variant-case: {args.variant_case} is not one of the cases {', '.join(case_names)}")
    if not torch.cuda.is_available() and args.size != "tiny":
        sys.exit("document_masking.py: no CUDA device; a CPU smoke run is --size tiny --seq 256")
    n = WARMUP + ITERS
    try:
        loader = iter(build_train_loader([(args.data, 1.0)], args.seq, args.batch, num_streams=args.batch,
                                         emit_doc_boundaries=True))
        batches = [next(loader) for _ in range(n)]
    except DataInputError as e:
        sys.exit(f"document_masking.py: --data: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = torch.stack([b["tokens"] for b in batches]).to(device)
    cases = {"demo": torch.stack([b["doc_starts"] for b in batches])}
    for mean in args.doc_len:
        cases[f"doc{mean}"] = drawn_starts(tuple(cases["demo"].shape), mean, seed=mean)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "data": args.data,
               "mamba_ssd_triton": has_mamba_ssd(), "causal_conv1d": has_causal_conv1d(),
               "cases": {c: {"docs_per_row": docs_per_row(s),
                             "masked_batches": f"{sum(masking_needed(b[:, :-1]) for b in s)}/{n}"}
                         for c, s in cases.items()},
               "train": []}
    variant_archs = [a for a in args.variant_archs.split(",") if a]
    variant_case = args.variant_case or list(cases)[-1]
    variants = {v: VARIANTS[v] for v in args.flex_options.split(",") if v}
    results["attention"] = attention_rows(args.size, cases, variants, device)
    for arch in args.archs.split(","):
        results["train"] += arch_rows(arch, args.size, tokens, cases, variants if arch in variant_archs else {},
                                      variant_case)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"mamba-ssm Triton SSD: {results['mamba_ssd_triton']}, causal-conv1d: {results['causal_conv1d']}")
    for case, info in results["cases"].items():
        print(f"case {case}: {info['docs_per_row']:.1f} documents per {args.seq}-token row, "
              f"{info['masked_batches']} batches need the mask")
    print("attention alone, fwd+bwd ms (llama heads, the case's first batch):")
    for r in results["attention"]:
        ms = r["time"].get("fwd_bwd_ms", float("nan"))
        print(f"  {r['kernel']:<18}{r['case']:<10}{ms:>8.2f}  {r['time'].get('error', '')}")
    print(f"{'arch':<14}{'flex':<10}{'case':<10}{'off tok/s':>11}{'on tok/s':>11}{'on/off':>8}  masked")
    for r in results["train"]:
        off, on = r["off"]["tokens_per_s"], r["on"].get("tokens_per_s", float("nan"))
        note = r["on"].get("masked_steps", r["on"].get("error", ""))
        print(f"{r['arch']:<14}{r['flex']:<10}{r['case']:<10}{off:>11,.0f}{on:>11,.0f}"
              f"{r.get('on_vs_off', float('nan')):>8.3f}  {note}")


if __name__ == "__main__":
    main()
