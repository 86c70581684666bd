"""Decode benchmark in the shape of PAPER T13: batch 4, 512-token prompt, tokens/s and cache memory
at total lengths 1K-32K, our five architectures and transformers' LlamaForCausalLM in one run.

    python benchmarks/inference.py --out runs/inference                 # H200: 1B presets, bf16
    python benchmarks/inference.py --device cpu --preset tiny --prompt 8 --lengths 24,40 --warmup 1 --steps 2 --out /tmp/inference
    python benchmarks/inference.py --replot runs/inference/inference.json --out runs/inference

Each length is timed in steady state: after the real prefill of the prompt, the cache is set to
hold `total - 1` tokens (`StaticCache.pretend_length`: a step's work does not depend on the cached
values), then `--warmup` steps and `--steps` timed steps (one synchronisation per block). tokens/s
= batch / step time at that context: the rate at the end of a generation to that total, so it is
below the paper's rate averaged over the whole generation (a conservative comparison). Memory
bound per step: (bytes of the weights a step reads + bytes of cache read) / `--bandwidth` (4.8 TB/s,
H200 HBM3e): every weight, but of an MoE layer's routed experts at most batch x top_k (`weight_bytes`);
the table prints each row's fraction of it. transformers' Llama decodes with its own
`StaticCache` sized to each total (as `generate(cache_implementation="static")` allocates it;
rounded up to 256 slots like ours, as unaligned sizes fall onto slow cuBLAS kernels), eager unless
`--hf-compile`. Our step runs in `--variants` side by side, one row each on the same model: `eager`
(the blocks' ops one by one, replayed as a CUDA graph), `compiled` (`Decoder(compile=True)`: each
block through torch.compile, the write and read of the attention cache between them on the
Decoder's default kernel, our Triton flash-decoding on CUDA, captured the same way; row "<arch>
compiled"), `compiled-split-k` (the read on the split-K PyTorch form instead) and `compiled-attn`
(the read compiled, `attention="compiled"`); the last two are not run on models without attention,
where they are `compiled`. The table gives
each row's fraction of the memory bound and of the issue-12 target (3x the paper, or 80% of the
bound where 3x exceeds it); `--profile` adds, per row, kernels per step, the top kernels, the top ops
by input shape and the shares by kind.
Writes inference.json and inference.png (matplotlib) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model, run as a script or imported by path

from gpu_model import positive_ints, profile_lines, profile_summary  # noqa: E402

from pretrain.model import build_model, model_config  # noqa: E402
from pretrain.model.decode import Decoder  # noqa: E402
from pretrain.model.moe import MoE  # noqa: E402
from pretrain.model.ops import reference_kernels  # noqa: E402
from pretrain.model.sampling import greedy_tokens  # noqa: E402

ARCHS = ("llama", "swa", "mamba2", "inter_hybrid", "intra_hybrid")
# PAPER T13 (1B, batch 4, 512-token prompt): tokens/s at total length.
PAPER_T13 = {
    "llama": {2048: 373, 4096: 214, 8192: 115, 16384: 60, 32768: 30},
    "mamba2": {2048: 2528, 4096: 2647, 8192: 2738, 16384: 2782, 32768: 2917},
    "inter_hybrid": {2048: 969, 4096: 828, 8192: 595, 16384: 373, 32768: 213},
    "intra_hybrid": {2048: 1089, 4096: 918, 8192: 683, 16384: 464, 32768: 280},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Mean seconds per call of `step` over `steps` calls after `warmup`."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def weight_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights one decode step of `batch` tokens reads: every parameter once (a tied
    embedding is read as the head), but of an untied input embedding only the batch's rows, and of
    each MoE layer's routed experts at most batch x top_k (every token's experts distinct)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "tie_embeddings", getattr(config, "tie_word_embeddings", True)):
        embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding)).weight
        total -= (embedding.shape[0] - min(batch, embedding.shape[0])) * embedding[0].numel() * embedding.element_size()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        n_experts = experts.w1.shape[0]
        per_expert = sum(w.numel() * w.element_size() for w in (experts.w1, experts.w2, experts.w3)) // n_experts
        total -= (n_experts - min(n_experts, batch * moe.cfg.top_k)) * per_expert
    return total


def point(total: int, batch: int, step_s: float, weights: int, cache: int, allocated: int,
          bandwidth: float, paper: dict[int, float]) -> dict[str, Any]:
    """One row's figures at one total; the target (issue 12) is 3x the paper's rate, or 80% of the
    memory bound where 3x would exceed it."""
    bound_s = (weights + cache) / bandwidth
    tok_s = batch / step_s
    target = min(3 * paper[total], 0.8 * batch / bound_s) if total in paper else None
    return {"total": total, "step_ms": step_s * 1e3, "tokens_per_s": tok_s,
            "cache_bytes": cache, "cache_allocated_bytes": allocated, "bound_ms": bound_s * 1e3,
            "bound_fraction": bound_s / step_s, "paper_tokens_per_s": paper.get(total),
            "vs_paper": tok_s / paper[total] if total in paper else None,
            "target_tokens_per_s": target, "vs_target": tok_s / target if target else None}


# the Decoder's arguments per variant: blocks eager or torch.compile'd, the attention read's kernel
VARIANTS: dict[str, dict[str, Any]] = {"eager": {}, "compiled": {"compile": True},
                                       "compiled-split-k": {"compile": True, "attention": "split_k"},
                                       "compiled-attn": {"compile": True, "attention": "compiled"}}


def variants_for(model, variants: list[str]) -> list[str]:
    """`variants` less those that only change the attention read, on a model without attention."""
    if set(model.config.blocks) != {"M"}:
        return variants
    return [v for v in variants if "attention" not in VARIANTS[v]]


@torch.no_grad()
def bench_ours(arch: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One row per decode variant, on one model (each variant its own decoder and caches)."""
    torch.manual_seed(0)
    model = build_model(arch, args.preset, device=device).to(dtype).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), device=device)
    rows = []
    for variant in variants_for(model, args.variants):
        t0 = time.perf_counter()
        try:
            rows.append(bench_variant(model, arch, variant, prompt, args, device))
        except Exception as e:  # one failing variant (a compile error, OOM) must not lose the others
            rows.append({"model": row_name(arch, variant), "arch": arch, "variant": variant,
                         "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
        rows[-1]["wall_s"] = time.perf_counter() - t0
        if VARIANTS[variant].get("compile"):
            torch._dynamo.reset()  # the next variant's blocks start from an empty compile cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def row_name(arch: str, variant: str) -> str:
    return arch if variant == "eager" else f"{arch} {variant}"


def bench_variant(model, arch: str, variant: str, prompt: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    lengths, extra = args.lengths, args.warmup + args.steps
    dec = Decoder(model, args.batch, lengths[-1] + extra, cuda_graph=device.type == "cuda" and not args.no_graph,
                  **VARIANTS[variant])
    _sync(device)
    t0 = time.perf_counter()
    with reference_kernels():  # not what is measured: the Triton SSD's JIT would cost ~35 s cold
        nxt = [greedy_tokens(dec.prefill(prompt))]
    _sync(device)
    prefill_s = time.perf_counter() - t0

    def step() -> None:
        nxt[0] = dec.greedy_step(nxt[0])

    weights, points, capture_s = weight_bytes(model, args.batch), [], 0.0
    for total in lengths:
        dec.cache.pretend_length(total - 1)
        t0 = time.perf_counter()
        if dec.use_graph:
            dec.capture_until(total - 1 + extra, greedy=True)
        capture_s += time.perf_counter() - t0
        step()  # the step at context `total` (compiles on its first call when not captured)
        cache = dec.cache.used_bytes()
        step_s = timed_steps(step, device, args.warmup - 1, args.steps)
        points.append(point(total, args.batch, step_s, weights, cache, dec.cache.allocated_bytes(), args.bandwidth,
                            PAPER_T13.get(arch, {})))
    result = {"model": row_name(arch, variant), "arch": arch, "variant": variant, "kind": "ours",
              "pattern": model.config.pattern, "weight_bytes": weights, "prefill_s_reference_kernels": prefill_s,
              "graph_capture_s": capture_s, "cuda_graph": dec.use_graph, "graph_error": dec.graph_error,
              "attention_kernel": dec.attention, "points": points}
    if args.profile:
        result["profile_at"] = lengths[-1]
        result.update(profile_summary(step, device, before_pass=lambda: dec.cache.pretend_length(lengths[-1] - 1)))
    return result


@torch.no_grad()
def attention_kernels(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One decode query over a static cache of S slots at the 1B llama layer's shapes (32 query
    heads, 8 KV heads, dim 64), replayed as CUDA graphs on a GPU: our Triton flash-decoding kernels
    (`decode_attention_triton`, on CUDA only), our split-K `decode_attention`, its compiled form
    (`compiled_decode_attention`, what the compiled-attn variant runs),
    SDPA on the whole cache with a boolean mask (GQA expanded, the kernels that take a mask), and
    SDPA on exactly the S keys without a mask (what the dynamic cache calls; there each step's new
    length re-plans cuDNN, here the length repeats so the plan is cached)."""
    import torch.nn.functional as F

    from pretrain.model.ops.decode_attention import compiled_decode_attention, decode_attention
    from pretrain.model.ops.decode_attention_triton import decode_attention_triton
    from pretrain.model.static_cache import chunk_of

    rows = []
    for s in args.lengths:
        q = torch.randn(args.batch, 32, 1, 64, device=device, dtype=dtype)
        k, v = (torch.randn(args.batch, 8, s, 64, device=device, dtype=dtype) for _ in range(2))
        k_pos, q_pos = torch.arange(s, device=device), torch.tensor([s - 1], device=device)
        mask = torch.ones(1, 1, 1, s, dtype=torch.bool, device=device)
        ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        kc, vc = (t.unflatten(2, (-1, chunk_of(s))).permute(2, 0, 1, 3, 4).contiguous() for t in (k, v))  # StaticKV
        kernels = {"decode_attention_triton": lambda: decode_attention_triton(q, kc, vc, q_pos, k_pos),
                   "decode_attention": lambda: decode_attention(q, kc, vc, q_pos, k_pos),
                   "decode_attention_compiled": lambda: compiled_decode_attention(q, kc, vc, q_pos, k_pos),
                   "sdpa_masked": lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask),
                   "sdpa_exact_length": lambda: F.scaled_dot_product_attention(q, ke, ve)}
        if device.type != "cuda":
            del kernels["decode_attention_triton"]
        rows.append({"slots": s, **{f"{name}_us": 1e6 * timed_steps(replayable(fn, device), device, 3, 50)
                                    for name, fn in kernels.items()}})
    return rows


def replayable(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`fn` as a CUDA graph replay on a GPU (its kernels' time without the launches), else as is."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _hf_static_cache(config, batch: int, length: int, device: torch.device, dtype: torch.dtype):
    from transformers import StaticCache

    try:
        return StaticCache(config=config, max_batch_size=batch, max_cache_len=length, device=device, dtype=dtype)
    except TypeError:  # transformers >= 5 sizes the layers lazily from the first keys
        return StaticCache(config=config, max_cache_len=length)


@torch.no_grad()
def bench_hf_llama(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' LlamaForCausalLM at the same dims, its own StaticCache per total length."""
    from transformers import LlamaForCausalLM

    from pretrain.model.hf import hf_config

    torch.manual_seed(0)
    cfg = model_config("llama", args.preset)
    config = hf_config(cfg)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if args.hf_compile else model.forward
    weights = weight_bytes(model, args.batch)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=device)
    extra, points = args.warmup + args.steps, []
    kv_bytes_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    for total in args.lengths:
        # (ids, attention_mask, position_ids, cache) positionally: the cache argument's name
        # changed in transformers 5 (past_key_values -> cache). The cache writes after the prompt;
        # a step reads all its max_cache_len slots (the mask hides the later ones) whatever the
        # position, so its cost is that of the context `total`.
        slots = -(-(total - 1 + extra) // 256) * 256
        cache = _hf_static_cache(config, args.batch, slots, device, dtype)
        nxt = model(prompt, None, None, cache, use_cache=True).logits[:, -1:].argmax(-1)
        pos = [total - 1]

        def step() -> None:
            p = torch.full((args.batch, 1), pos[0], device=device)
            out = forward(nxt, None, p, cache, use_cache=True)
            nxt.copy_(out.logits[:, -1:].argmax(-1))
            pos[0] += 1

        step_s = timed_steps(step, device, args.warmup, args.steps)
        used = args.batch * kv_bytes_per_token * total
        allocated = args.batch * kv_bytes_per_token * slots
        points.append(point(total, args.batch, step_s, weights, used, allocated, args.bandwidth, PAPER_T13["llama"]))
    return {"model": "transformers_llama" + ("_compiled" if args.hf_compile else ""), "kind": "peer",
            "weight_bytes": weights, "points": points,
            "note": "cache bytes computed from the config (K and V of every layer, bf16)"}


def plot(results: dict[str, Any], path: Path) -> Path:
    """T13-style: decode tokens/s (log) and cache MiB against total length; dashed: the paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in results["rows"]:
        if "points" not in row:
            continue
        totals = [p["total"] for p in row["points"]]
        line, = speed.plot(totals, [p["tokens_per_s"] for p in row["points"]], marker="o", label=row["model"])
        paper = PAPER_T13.get(row.get("arch", row["model"]))
        if paper and row.get("variant", "eager") == "eager":
            speed.plot(list(paper), list(paper.values()), linestyle="--", color=line.get_color(), alpha=0.6)
        if row.get("variant", "eager") == "eager":  # the variants share the cache
            memory.plot(totals, [p["cache_bytes"] / 2**20 for p in row["points"]], marker="o", label=row["model"])
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
    speed.set_yscale("log")
    speed.set(xlabel="total length (tokens)", ylabel="decode tokens/s (batch)",
              title=f"decode, batch {results['batch']}, prompt {results['prompt']} (dashed: PAPER T13)")
    memory.set(xlabel="total length (tokens)", ylabel="cache MiB", title="inference cache (batch)")
    speed.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(results: dict[str, Any]) -> str:
    lines = [f"one query's attention, {k['slots']} slots: "
             + ", ".join(f"{n.removesuffix('_us')} {t:.0f} us" for n, t in k.items() if n != "slots")
             for k in results.get("attention_kernels", [])]
    for row in results["rows"]:  # the profiles first: the short table closes the output
        if row.get("profile"):
            lines += profile_lines(f"{row['model']} at {row['profile_at']}", row)
    lines += [f"{'model':<28}{'total':>7}{'tokens/s':>11}{'step ms':>9}{'x paper':>9}{'bound ms':>10}"
              f"{'of bound':>10}{'of target':>11}{'cache MiB':>11}"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"{row['model']:<28}unavailable: {row['error']}")
            continue
        for p in row["points"]:
            vs = f"{p['vs_paper']:.2f}x" if p["vs_paper"] else "-"
            target = f"{p['vs_target']:.0%}" if p.get("vs_target") else "-"
            lines.append(f"{row['model']:<28}{p['total']:>7}{p['tokens_per_s']:>11,.0f}{p['step_ms']:>9.2f}{vs:>9}"
                         f"{p['bound_ms']:>10.2f}{p['bound_fraction']:>10.0%}{target:>11}"
                         f"{p['cache_bytes'] / 2**20:>11,.1f}")
    by_name = {row["model"]: row for row in results["rows"] if "points" in row}
    for row in results["rows"]:  # the decision between the variants, per architecture
        eager = by_name.get(row.get("arch")) if row.get("variant", "eager") != "eager" else None
        if eager is not None and row["model"] in by_name:
            ratios = " / ".join(f"{p['tokens_per_s'] / e['tokens_per_s']:.2f}x"
                                for p, e in zip(row["points"], eager["points"]))
            totals = ", ".join(str(p["total"]) for p in row["points"])
            lines.append(f"{row['model']} / {eager['model']} tokens/s at {totals}: {ratios}")
    if "wall_s" in results:
        lines.append(f"({results['wall_s']:.0f} s in all; target: 3x the paper's tokens/s, or 80% of the memory bound "
                     "where 3x exceeds it)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for inference.json and inference.png")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--preset", default="1b", help="model size preset (tiny for a CPU smoke run)")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--lengths", type=positive_ints, default="1024,2048,4096,8192,16384,32768",
                    help="total lengths (prompt included)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                    help="bfloat16 on cuda, float32 on cpu by default")
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bandwidth for the bound, bytes/s")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' Llama")
    ap.add_argument("--hf-compile", action="store_true", help="torch.compile(mode='reduce-overhead') the HF step")
    ap.add_argument("--no-graph", action="store_true", help="our decode step eager (no CUDA graph)")
    ap.add_argument("--variants", default=None,
                    help="our step's variants, one row each: eager (blocks eager), compiled (torch.compile'd "
                         "blocks, the Decoder's default attention read: Triton on cuda), compiled-split-k (compiled "
                         "blocks, split-K PyTorch read), compiled-attn (compiled blocks and attention read); "
                         "all captured in CUDA graphs on a GPU. Default: eager,compiled,compiled-attn on cuda, "
                         "eager on cpu")
    ap.add_argument("--profile", action="store_true",
                    help="per model, where a step's time goes at the longest length (kernels, ops by shape, kinds)")
    ap.add_argument("--attention-kernels", action="store_true", help="also time one decode query's attention kernels")
    ap.add_argument("--replot", default=None, help="draw the PNG from this JSON and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        print(f"wrote {plot(results, out / 'inference.png')}")
        return
    args.lengths = sorted(args.lengths)
    if min(args.warmup, args.steps, args.batch, args.prompt) < 1 or not args.bandwidth > 0:
        raise SystemExit("inference: --warmup, --steps, --batch and --prompt must be >= 1, --bandwidth > 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise SystemExit(f"inference: --device {args.device}: use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("inference: no CUDA device here; a CPU smoke run is --device cpu --preset tiny (see --help)")
    gaps = [b - a for a, b in zip([args.prompt, *args.lengths], args.lengths)]
    if min(gaps) <= args.warmup + args.steps:
        raise SystemExit(f"inference: --lengths must exceed --prompt and each other by more than --warmup + --steps "
                         f"({args.warmup + args.steps}); got prompt {args.prompt}, lengths {args.lengths}")
    args.variants = (args.variants or ("eager,compiled,compiled-attn" if device.type == "cuda" else "eager")).split(",")
    if not set(args.variants) <= set(VARIANTS):
        raise SystemExit(f"inference: --variants takes {','.join(VARIANTS)}; got {','.join(args.variants)}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
        "prompt": args.prompt, "bandwidth": args.bandwidth, "warmup": args.warmup, "steps": args.steps,
        "rows": []}
    jobs: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        (a, lambda a=a: bench_ours(a, args, device, dtype)) for a in args.archs.split(",")]
    if not args.no_hf:
        jobs.append(("transformers_llama", lambda: [bench_hf_llama(args, device, dtype)]))
    start = time.perf_counter()
    if args.attention_kernels:
        results["attention_kernels"] = attention_kernels(args, device, dtype)
    for name, job in jobs:
        before = len(results["rows"])
        try:
            results["rows"] += job()
        except Exception as e:  # one failing row (OOM, a missing package) must not lose the others
            results["rows"].append({"model": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
        results["wall_s"] = time.perf_counter() - start
        for row in results["rows"][before:]:  # progress, in case a time limit cuts the run
            figures = ", ".join(f"{p['total']}: {p['tokens_per_s']:,.0f} tok/s" for p in row.get("points", []))
            print(f"[{results['wall_s']:.0f} s] {row['model']}: {figures or row.get('error')}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out / "inference.json").write_text(json.dumps(results, indent=2))
    try:
        results["plot"] = str(plot(results, out / "inference.png"))
    except ImportError:
        results["plot"] = None  # no matplotlib (the GPU machine): --replot the JSON elsewhere
    (out / "inference.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
