"""GPU model benchmark: kernel timings and 1B training-step throughput per architecture.

    python benchmarks/gpu_model.py [--out results.json] [--archs llama,mamba2,...] [--compile] [--fp8 tensorwise]
                                   [--precision autocast|cast|copies]

Prints a table last and writes full results as JSON. Training step: paper 1B dims, vocab 128,256,
sequence 8192, batch 2, bf16 autocast, fused AdamW, eager, no activation checkpointing (the setup of
shared/GPU.md's peer table); median of 6 steps after 3 warm-up steps. MFU against 764 TFLOP/s
(the measured bf16 matmul ceiling), FLOPs from pretrain.accounting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from parallel.float8 import FP8_RECIPES
from parallel.mixed_precision import WorkingCopies, cast_parameters
from pretrain.accounting import flops_per_token
from pretrain.model import build_model
from pretrain.model.mamba2 import Mamba2
from pretrain.model.ops import reference_kernels
from pretrain.model.parallelize import parallelize_hybrid
from pretrain.optim import AdamWWithCopies

PRECISIONS = ("autocast", "cast", "copies")
PEAK_FLOPS = 764e12


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn` over `iters` runs after `warmup` (CUDA events)."""
    return step_time_ms(fn, torch.device("cuda"), warmup, iters)


def step_time_ms(fn: Callable[[], None], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn` over `iters` runs after `warmup`: CUDA events on a GPU, the wall
    clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


KERNEL_KINDS = (  # (kind, name fragments), first match wins: attention kernels' names also hold "sm90" / "gemm",
    # Inductor's fused kernels name their ops ("triton_poi_fused__to_copy_cat_..."), so they go before copies
    ("attention", ("sdpa", "flash", "fmha", "attention", "flex")),
    ("optimizer", ("adamw", "fusedoptimizer", "multi_tensor_apply")),  # before copies: adamw_with_copy
    ("ssd scan", ("chunk_scan", "chunk_state", "state_passing", "bmm_chunk", "chunk_cumsum", "selective_state")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "_grouped_mm")),
    ("fused (inductor)", ("triton_",)),
    ("loss kernel", ("softmax_xent",)),
    ("copy / cast / cat", ("copy", "catarray", "aten::cat", "transpose")),
    ("conv", ("conv",)),
    ("other eager elementwise / reduce", ("elementwise", "reduce", "aten::")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def profile_summary(step: Callable[[], None], device: torch.device, top: int = 6, top_ops: int = 12,
                    before_pass: Callable[[], None] = lambda: None) -> dict:
    """Where a step's time goes: kernels (CUDA) or ops (CPU) launched per step, the top ones by self
    time over 3 steps, the shares by kind (GEMMs, attention, copies, ...), and the top aten ops by
    their kernels' time grouped by input shape (which GEMM, which copy: a kernel's name does not say).
    The benchmarks' answer where a target is missed. Two passes of 3 steps, each after `before_pass`
    (a decoder rewinds its cache there, so that both profile the same context)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)

    def profiled(activities: list, record_shapes: bool = False):
        before_pass()
        with profile(activities=activities, record_shapes=record_shapes) as prof:
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize(device)
        return prof

    events = [e for e in profiled([ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]).key_averages()
              if key(e) > 0]
    total = sum(key(e) for e in events) or 1
    kinds: dict[str, float] = {}
    for e in events:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + key(e) / total
    # a second pass with host ops and shapes (their own overhead stays out of the kernel shares)
    shaped = profiled([ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), record_shapes=True)
    ops = [e for e in shaped.key_averages(group_by_input_shape=True) if e.key.startswith("aten::") and key(e) > 0]
    ops = sorted(ops, key=key, reverse=True)[:top_ops]
    return {"kernels_per_step": sum(e.count for e in events) / 3,
            "profile": [{"name": e.key[:80], "share": key(e) / total, "us_per_step": key(e) / 3}
                        for e in sorted(events, key=key, reverse=True)[:top]],
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "ops": [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls_per_step": e.count / 3,
                     "us_per_step": key(e) / 3} for e in ops]}


def profile_lines(title: str, row: dict) -> list[str]:
    """`profile_summary`'s result as the benchmarks print it: kernels, ops by shape, shares by kind."""
    lines = [f"{title}: {row['kernels_per_step']:.0f} kernels per step"]
    lines += [f"    {k['share']:>5.0%} {k['us_per_step']:>10.0f} us  {k['name']}" for k in row["profile"]]
    lines += [f"    op {o['us_per_step']:>10.0f} us {o['calls_per_step']:>5.0f}x  {o['op']} {o['shapes']}"
              for o in row.get("ops", [])]
    return lines + ["    by kind: " + ", ".join(f"{k} {v:.0%}" for k, v in row["kinds"].items())]


def mamba_mixer_timings() -> dict[str, float]:
    mixer = Mamba2(2048, 32, 128, 128, chunk_size=256).cuda()
    mixer.reset_parameters()
    mixer = mixer.to(torch.bfloat16)
    u = torch.randn(4, 8192, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def fwd():
        with torch.no_grad():
            mixer(u)

    def fwd_bwd():
        mixer(u).sum().backward()

    out = {"mamba2_mixer_fwd_ms": cuda_time(fwd), "mamba2_mixer_fwd_bwd_ms": cuda_time(fwd_bwd)}
    with reference_kernels():
        out["mamba2_mixer_reference_fwd_ms"] = cuda_time(fwd, 1, 3)
    return out


def time_train_step(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], vocab: int,
                    batch: int = 2, seq: int = 8192, device: torch.device | str = "cuda", warmup: int = 3,
                    iters: int = 6, after_step: Callable[[], None] | None = None,
                    precision: str = "autocast", profile: bool = False) -> dict:
    """One training step of any model as shared/GPU.md times it: `loss_fn(inputs, targets)` under
    bf16 autocast on a GPU (fp32 on the CPU), backward, fused AdamW (plain on the CPU), median of
    `iters` after `warmup`. The same function times our models and the peers. `precision` (see
    parallel/mixed_precision.py): "autocast"; "cast", bf16 parameters cast once per step; "copies",
    bf16 working copies and the AdamW that rewrites them (the trainer's one-GPU setup)."""
    if precision not in PRECISIONS:
        raise ValueError(f"time_train_step: precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if precision == "copies":
        copies = WorkingCopies(model, torch.bfloat16)
        opt: torch.optim.Optimizer = AdamWWithCopies(model.parameters(), copies, lr=1e-4)
        bf16_params = copies.swapped
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        bf16_params = (lambda: cast_parameters(model, torch.bfloat16)) if precision == "cast" else contextlib.nullcontext
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with bf16_params():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and precision == "autocast"):
                loss = loss_fn(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

    ms = step_time_ms(step, device, warmup, iters)
    out = {"step_ms": ms, "tokens_per_s": batch * seq / (ms / 1e3),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    if profile:  # after the timed steps: the profiler's own cost stays out of them
        out.update(profile_summary(step, device))
    return out


def train_step_throughput(arch: str, batch: int = 2, seq: int = 8192, size: str = "1b",
                          device: str = "cuda", warmup: int = 3, iters: int = 6, compile: bool = False,
                          fp8: str = "none", precision: str = "autocast",
                          activation_checkpointing: bool = False, profile: bool = False,
                          vocab_size: int | None = None) -> dict:
    """`compile`, `fp8`, `activation_checkpointing`: as the trainer's train.* keys (parallelize_hybrid);
    `precision`, `profile` as in `time_train_step`; `vocab_size` replaces the preset's (the trainer
    takes its data's: 8,192 for the demo corpus)."""
    torch.manual_seed(0)
    model = build_model(arch, size, device=device, **({"vocab_size": vocab_size} if vocab_size else {}))
    parallelize_hybrid(model, None, activation_checkpointing=activation_checkpointing, compile=compile, fp8=fp8)
    options = {"compile": compile, "fp8": fp8, "precision": precision, "activation_checkpointing": activation_checkpointing}

    def update_bias():
        for moe in model.moe_layers():
            moe.update_bias()

    timing = time_train_step(model, model.loss, model.config.vocab_size, batch, seq, device, warmup, iters,
                             after_step=update_bias, precision=precision, profile=profile)
    fpt = flops_per_token(model.config, seq)["total"]
    return {"arch": arch, "vocab_size": model.config.vocab_size, **options, **timing,
            "mfu": timing["tokens_per_s"] * fpt / PEAK_FLOPS, "flops_per_token": fpt,
            "params": sum(p.numel() for p in model.parameters())}


def positive_ints(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers >= 1 (lengths, sequence sizes)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes integers >= 1, comma-separated (got {text!r})")
    return values


def require_cuda(script: str, why: str) -> None:
    """One line, not torch's traceback, where a benchmark can only measure a GPU."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: needs a CUDA GPU ({why})")


def row_or_error(arch: str, measure: Callable[[], dict]) -> dict:
    """`measure()`'s row, or one naming its failure (an OOM, a compile error): the next row still runs."""
    try:
        return measure()
    except torch.OutOfMemoryError as e:
        return {"arch": arch, "error": f"OOM: {e}".splitlines()[0]}
    except Exception as e:  # noqa: BLE001 - reported in the row, as the tables print it
        return {"arch": arch, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def record_row(rows: list[dict], out: str, arch: str, measure: Callable[[], dict], **labels) -> dict:
    """Run one benchmark row (`row_or_error`), append it with its labels, free the GPU and compile
    caches for the next row, and rewrite `out` so a time limit keeps what finished."""
    row = row_or_error(arch, measure)
    row.update(labels)
    rows.append(row)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    with open(out, "w") as f:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_model.json")
    ap.add_argument("--archs", default="llama,swa,mamba2,inter_hybrid,intra_hybrid,hybrid_moe")
    ap.add_argument("--compile", action="store_true", help="compile every block (train.compile)")
    ap.add_argument("--fp8", default="none", choices=FP8_RECIPES, help="torchao float8 recipe (train.fp8)")
    ap.add_argument("--precision", default="autocast", choices=PRECISIONS,
                    help="bf16 autocast, parameters cast once per step, or working copies (time_train_step)")
    args = ap.parse_args()
    require_cuda("gpu_model.py", "it times the 1B models' training steps in bf16")
    options = {"compile": args.compile, "fp8": args.fp8, "precision": args.precision}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **mamba_mixer_timings(),
               "train": []}
    for arch in args.archs.split(","):
        results["train"].append(row_or_error(arch, lambda: train_step_throughput(arch, **options)))
        torch.cuda.empty_cache()  # the previous model and optimizer died with their function
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(f"Mamba2 mixer (d 2048, B4 L8192, bf16): fwd {results['mamba2_mixer_fwd_ms']:.1f} ms, "
          f"fwd+bwd {results['mamba2_mixer_fwd_bwd_ms']:.1f} ms, reference fwd "
          f"{results['mamba2_mixer_reference_fwd_ms']:.1f} ms")
    print(f"{'arch':<14}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for r in results["train"]:
        if "error" in r:
            print(f"{r['arch']:<14}{r['error']}")
        else:
            print(f"{r['arch']:<14}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}{r['peak_mem_gib']:>10.1f}")


if __name__ == "__main__":
    main()
