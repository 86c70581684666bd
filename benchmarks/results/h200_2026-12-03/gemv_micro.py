"""Skinny GEMV (M=4 rows) at the 1B decode shapes: cuBLAS F.linear vs Triton variants. CUDA graphs
over many weight copies (no L2 reuse, no launch gaps). Prints a table; JSON under $OUT."""
import itertools, json, os, sys, time
import torch, triton, triton.language as tl
import torch.nn.functional as F

@triton.jit
def gemv_dot(x_ptr, xs, w_ptr, ws, y_ptr, ys, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             SPLIT: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    kspan = tl.cdiv(K, SPLIT)
    k_lo = tl.program_id(1) * kspan
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(k_lo, k_lo + kspan, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + m[:, None] * xs + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + n[:, None] * ws + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    out = y_ptr + tl.program_id(1) * M * ys + m[:, None] * ys + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))

@triton.jit
def gemv_sum(x_ptr, xs, w_ptr, ws, y_ptr, ys, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             SPLIT: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    kspan = tl.cdiv(K, SPLIT)
    k_lo = tl.program_id(1) * kspan
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(k_lo, k_lo + kspan, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + m[:, None] * xs + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + n[:, None] * ws + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out = y_ptr + tl.program_id(1) * M * ys + m[:, None] * ys + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))

SHAPES = {"in_proj 8480x2048": (8480, 2048), "out_proj 2048x4096": (2048, 4096), "gate 8192x2048": (8192, 2048),
          "gate_up 16384x2048": (16384, 2048), "down 2048x8192": (2048, 8192), "qkv 3072x2048": (3072, 2048),
          "o 2048x2048": (2048, 2048), "head 128256x2048": (128256, 2048)}
M = 4
dev = "cuda"

def bench(fn_over_copies, reps):
    fn_over_copies()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn_over_copies()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (5 * reps)

results = []
for name, (N, K) in SHAPES.items():
    nbytes = N * K * 2
    R = max(2, -(-600_000_000 // nbytes))
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(R)]
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    ref = F.linear(x.float(), ws[0].float())
    ys = [torch.empty(M, N, device=dev, dtype=torch.bfloat16) for _ in range(R)]
    def cublas():
        for w, y in zip(ws, ys):
            torch.mm(x, w.t(), out=y)
    us = bench(cublas, R)
    row = {"shape": name, "MB": nbytes / 1e6, "cublas_us": us, "cublas_TBs": nbytes / us / 1e6, "triton": []}
    cands = []
    for BN, BK, warps, stages, split in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5), (1, 2, 4)):
        cands.append(("dot", BN, BK, warps, stages, split))
    for BN, BK, warps, stages, split in itertools.product((4, 8, 16), (256, 512), (4, 8), (3,), (1, 2)):
        cands.append(("sum", BN, BK, warps, stages, split))
    t_start = time.time()
    for kind, BN, BK, warps, stages, split in cands:
        if K % (split * BK):
            continue
        kern = gemv_dot if kind == "dot" else gemv_sum
        BM = 16 if kind == "dot" else 4
        parts = [torch.empty(split, M, N, device=dev, dtype=torch.bfloat16 if split == 1 else torch.float32) for _ in range(R)]
        grid = (triton.cdiv(N, BN), split)
        def run():
            for w, p in zip(ws, parts):
                kern[grid](x, x.stride(0), w, w.stride(0), p, p.stride(1), M, N, K, BM=BM, BN=BN, BK=BK, SPLIT=split,
                           num_warps=warps, num_stages=stages)
        try:
            run(); torch.cuda.synchronize()
            err = float((parts[0].float().sum(0) - ref).abs().max() / ref.abs().max())
            us = bench(run, R)
        except Exception as e:
            row["triton"].append({"cfg": [kind, BN, BK, warps, stages, split], "error": str(e)[:100]})
            continue
        row["triton"].append({"cfg": [kind, BN, BK, warps, stages, split], "us": us, "TBs": nbytes / us / 1e6, "err": err})
    ok = [t for t in row["triton"] if "us" in t and t["err"] < 1e-2]
    best = min(ok, key=lambda t: t["us"]) if ok else None
    row["best"] = best
    best1 = min((t for t in ok if t["cfg"][5] == 1), key=lambda t: t["us"], default=None)
    row["best_nosplit"] = best1
    results.append(row)
    print(f"{name:22s} {nbytes/1e6:7.1f} MB  cublas {row['cublas_us']:7.2f} us {row['cublas_TBs']:.2f} TB/s | "
          f"best {best['us'] if best else 0:7.2f} us {best['TBs'] if best else 0:.2f} TB/s {best['cfg'] if best else ''} | "
          f"nosplit {best1['us'] if best1 else 0:.2f} {best1['cfg'] if best1 else ''} ({len(ok)} cfgs)", flush=True)
    del ws, ys
    torch.cuda.empty_cache()
json.dump(results, open(os.path.join(os.environ.get("OUT", "."), "gemv_micro.json"), "w"), indent=1)
