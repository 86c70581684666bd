"""How fast can one batch-4 GEMV stream its weights? cuBLAS vs a Triton tl.dot GEMV (M padded to 16)
vs a Triton GEMV on CUDA-core FMAs (no padding: 4 rows x BK products per weight block, reduced once
at the end), against a plain read of the same bytes (a Triton sum). Per shape of the 1B decode
chain (in 8480x2048, out 2048x4096, gate_up 16384x2048, down 2048x8192), 13 distinct weight copies
back to back in one CUDA graph (nothing in L2), median of 5 x 20 replays. Prints us per 13 GEMVs'
layer share, TB/s and the error against fp32 x @ w.T; JSON under $OUT."""
import json
import os

import torch
import triton
import triton.language as tl

L, M, D = 13, 4, 2048
SHAPES = {"in": (8480, D), "out": (D, 4096), "gate_up": (16384, D), "down": (D, 8192)}
DOT_CFG = {"in": (32, 128, 4, 5), "out": (16, 256, 4, 5), "gate_up": (64, 128, 4, 3), "down": (16, 256, 4, 5)}
FMA_CFGS = [(8, 256, 4), (16, 256, 4), (4, 512, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8)]


@triton.jit
def gemv_dot(x_ptr, w_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.arange(0, 16)
    acc = tl.zeros((16, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m[:, None] < 4, other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n[:, None] < N, other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc, mask=(m[:, None] < 4) & (n[None, :] < N))


@triton.jit
def gemv_fma(x_ptr, w_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    a0 = tl.zeros((BN, BK), tl.float32)
    a1 = tl.zeros((BN, BK), tl.float32)
    a2 = tl.zeros((BN, BK), tl.float32)
    a3 = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n[:, None] < N, other=0.0).to(tl.float32)
        a0 += w * tl.load(x_ptr + k).to(tl.float32)[None, :]
        a1 += w * tl.load(x_ptr + K + k).to(tl.float32)[None, :]
        a2 += w * tl.load(x_ptr + 2 * K + k).to(tl.float32)[None, :]
        a3 += w * tl.load(x_ptr + 3 * K + k).to(tl.float32)[None, :]
    mask = n < N
    tl.store(y_ptr + n, tl.sum(a0, 1), mask=mask)
    tl.store(y_ptr + N + n, tl.sum(a1, 1), mask=mask)
    tl.store(y_ptr + 2 * N + n, tl.sum(a2, 1), mask=mask)
    tl.store(y_ptr + 3 * N + n, tl.sum(a3, 1), mask=mask)


@triton.jit
def stream_sum(w_ptr, out_ptr, K, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        acc += tl.load(w_ptr + n[:, None] * K + k[None, :]).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.sum(acc, 1), 0))


def time_graph(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / reps / L)
    return sorted(times)[2]


def main():
    torch.manual_seed(0)
    results = {}
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(L)]
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ ws[0].float().t()
        y = torch.empty(M, n, device="cuda", dtype=torch.float32)
        yb = torch.empty(M, n, device="cuda", dtype=torch.bfloat16)
        sink = torch.empty(n, device="cuda", dtype=torch.float32)
        nbytes = n * k * 2
        variants = {"cublas": (lambda: [torch.mm(x, w.t(), out=yb) for w in ws], yb)}
        bn, bk, warps, stages = DOT_CFG[name]
        variants["triton dot"] = (lambda bn=bn, bk=bk, warps=warps, stages=stages: [
            gemv_dot[(triton.cdiv(n, bn),)](x, w, y, n, k, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
            for w in ws], y)
        for bn, bk, warps in FMA_CFGS:
            if n % bn or k % bk:
                continue
            for stages in (1, 3):
                variants[f"fma {bn}x{bk} w{warps} s{stages}"] = (
                    lambda bn=bn, bk=bk, warps=warps, stages=stages: [
                        gemv_fma[(n // bn,)](x, w, y, n, k, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
                        for w in ws], y)
        for bn, bk in ((8, 256), (16, 512)):
            if n % bn == 0:
                variants[f"stream sum {bn}x{bk}"] = (lambda bn=bn, bk=bk: [
                    stream_sum[(n // bn,)](w, sink, k, BN=bn, BK=bk, num_warps=4) for w in ws], None)
        results[name] = {}
        for vname, (fn, out) in variants.items():
            try:
                us = time_graph(fn)
                err = None
                if out is not None:
                    fn()
                    torch.cuda.synchronize()
                    last = out.float()
                    expect = x.float() @ ws[-1].float().t()
                    err = float((last - expect).abs().max() / expect.abs().max())
                results[name][vname] = {"us": us, "TBs": nbytes / us / 1e6, "err": err}
                print(f"{name:8s} {vname:24s} {us:8.2f} us  {nbytes / us / 1e6:5.2f} TB/s  err {err}", flush=True)
            except Exception as e:  # noqa: BLE001 - a record per variant
                results[name][vname] = {"error": repr(e)[:300]}
                print(f"{name:8s} {vname:24s} ERROR {repr(e)[:200]}", flush=True)
        del ws, ref
    # a layer: the four GEMVs, each at its best variant of a kind
    print("\nper layer (sum of the four shapes), us and TB/s over 152.2 MB:")
    layer_bytes = sum(n * k * 2 for n, k in SHAPES.values())
    summary = {}
    for kind in ("cublas", "triton dot", "fma", "stream sum"):
        best = [min((r["us"] for v, r in results[s].items() if v.startswith(kind) and "us" in r), default=None)
                for s in SHAPES]
        if None not in best:
            total = sum(best)
            summary[kind] = {"us": total, "TBs": layer_bytes / total / 1e6, "per_shape": best}
            print(f"  {kind:12s} {total:7.2f} us  {layer_bytes / total / 1e6:5.2f} TB/s  "
                  f"({', '.join(f'{b:.2f}' for b in best)})")
    json.dump({"results": results, "summary": summary},
              open(os.path.join(os.environ.get("OUT", "."), "gemv_stream.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
