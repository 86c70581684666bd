"""Does programmatic dependent launch (PDL) close the ~3 us fixed cost of each decode GEMV?
A chain of L Mamba2+MLP-like layers at the 1B decode shapes (M = 4 rows): per layer four GEMVs
(in 8480x2048, out 2048x4096, gate_up 16384x2048, down 2048x8192) each followed by a small kernel,
in one CUDA graph, weights distinct per layer (nothing stays in L2).
Variants: cublas (torch.mm) + small Triton kernels (PDL or not); Triton GEMVs (the best configs of
h200_2026-12-03/gemv_micro.py), split-K partials summed by the next kernel; PDL on every kernel with
the dependents released at the start ("triton+pdl") or late ("late": a GEMV after its K loop, a small
kernel after its wait); "prefetch": the first weight block loaded before the wait. Prints us per
layer; JSON under $OUT. A record of the 2026-12-04 session (ran from a scratch devrun/ directory)."""
import json, os, sys
import torch, triton, triton.language as tl

L = int(os.environ.get("LAYERS", 13))
M, D = 4, 2048


@triton.jit
def gemv(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
         SPLIT: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, LATE: tl.constexpr):
    """y[split, m, n] = x[m, k-span] . w[n, k-span] (fp32 partials when SPLIT > 1)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    kspan = K // SPLIT
    k_lo = tl.program_id(1) * kspan
    k = k_lo + tl.arange(0, BK)
    if PDL and not LATE:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        if not PREFETCH:
            tl.extra.cuda.gdc_wait()
    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n[:, None] < N, other=0.0)  # independent of x
    if PDL and PREFETCH:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m[:, None] < M, other=0.0)
    acc = tl.dot(x, tl.trans(w))
    for k0 in range(k_lo + BK, k_lo + kspan, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m[:, None] < M, other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n[:, None] < N, other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if PDL and LATE:
        tl.extra.cuda.gdc_launch_dependents()
    out = y_ptr + tl.program_id(1) * M * N + m[:, None] * N + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def act(h_ptr, out_ptr, M, N_IN, N_OUT, GATED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr):
    """out[m, :N_OUT] = silu(h[m, :N_OUT]) (* h[m, N_OUT:2 N_OUT] when GATED)."""
    if PDL and not LATE:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL and LATE:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(h_ptr + row * N_IN + c, mask=c < N_OUT).to(tl.float32)
    y = a * tl.sigmoid(a)
    if GATED:
        y *= tl.load(h_ptr + row * N_IN + N_OUT + c, mask=c < N_OUT).to(tl.float32)
    tl.store(out_ptr + row * N_OUT + c, y.to(out_ptr.dtype.element_ty), mask=c < N_OUT)


@triton.jit
def residual(x_ptr, p_ptr, M, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr):
    """x[m] += sum over splits of p[s, m] (normalised, like an RMSNorm'd residual stream)."""
    if PDL and not LATE:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL and LATE:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + row * N + c).to(tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_ptr + (s * M + row) * N + c).to(tl.float32)
    acc = acc * tl.rsqrt(tl.sum(acc * acc, 0) / N + 1e-6)
    tl.store(x_ptr + row * N + c, acc.to(x_ptr.dtype.element_ty))


SHAPES = {"in": (8480, D), "out": (D, 4096), "gate_up": (16384, D), "down": (D, 8192)}
TRITON_CFG = {"in": (32, 128, 4, 5), "out": (16, 256, 4, 5), "gate_up": (64, 128, 4, 3), "down": (16, 256, 4, 5)}
dev = "cuda"
torch.manual_seed(0)
W = [{k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * kk ** -0.5 for k, (n, kk) in SHAPES.items()}
     for _ in range(L)]
x0 = torch.randn(M, D, device=dev, dtype=torch.bfloat16)


def make(kind, pdl=False, prefetch=False, split_out=1, split_down=1, late=False, small_pdl=None):
    small_pdl = pdl if small_pdl is None else small_pdl
    x = x0.clone()
    bufs = {"h_in": torch.empty(M, 8480, device=dev, dtype=torch.bfloat16),
            "a_in": torch.empty(M, 4096, device=dev, dtype=torch.bfloat16),
            "h_gu": torch.empty(M, 16384, device=dev, dtype=torch.bfloat16),
            "a_gu": torch.empty(M, 8192, device=dev, dtype=torch.bfloat16)}
    p_out = torch.empty(split_out, M, D, device=dev, dtype=torch.float32 if split_out > 1 else torch.bfloat16)
    p_down = torch.empty(split_down, M, D, device=dev, dtype=torch.float32 if split_down > 1 else torch.bfloat16)
    kw = dict(launch_pdl=True) if pdl else {}
    skw = dict(launch_pdl=True) if small_pdl else {}

    def mm(a, name, w, out, split):
        n, k = SHAPES[name]
        if kind == "cublas":
            torch.mm(a, w.t(), out=out[0])
            return
        bn, bk, warps, stages = TRITON_CFG[name]
        gemv[(triton.cdiv(n, bn), split)](a, w, out, M, n, k, BM=16, BN=bn, BK=bk, SPLIT=split, PDL=pdl,
                                          PREFETCH=prefetch, LATE=late, num_warps=warps, num_stages=stages, **kw)

    def run():
        x.copy_(x0)
        for w in W:
            mm(x, "in", w["in"], bufs["h_in"][None], 1)
            act[(M, 4096 // 1024)](bufs["h_in"], bufs["a_in"], M, 8480, 4096, GATED=False, BLOCK=1024, PDL=small_pdl, LATE=late, **skw)
            mm(bufs["a_in"], "out", w["out"], p_out, split_out)
            residual[(M,)](x, p_out, M, D, SPLIT=split_out, BLOCK=D, PDL=small_pdl, LATE=late, **skw)
            mm(x, "gate_up", w["gate_up"], bufs["h_gu"][None], 1)
            act[(M, 8192 // 1024)](bufs["h_gu"], bufs["a_gu"], M, 16384, 8192, GATED=True, BLOCK=1024, PDL=small_pdl, LATE=late, **skw)
            mm(bufs["a_gu"], "down", w["down"], p_down, split_down)
            residual[(M,)](x, p_down, M, D, SPLIT=split_down, BLOCK=D, PDL=small_pdl, LATE=late, **skw)
    return run, x


def time_graph(run, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
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
    return g, sorted(times)[2]


VARIANTS = {
    "cublas": dict(kind="cublas"),
    "cublas+pdl-small": dict(kind="cublas", small_pdl=True),
    "cublas+pdl-small late": dict(kind="cublas", small_pdl=True, late=True),
    "triton": dict(kind="triton"),
    "triton+pdl": dict(kind="triton", pdl=True),
    "triton+pdl+prefetch": dict(kind="triton", pdl=True, prefetch=True),
    "triton split2": dict(kind="triton", split_out=2, split_down=2),
    "triton+pdl split2": dict(kind="triton", pdl=True, split_out=2, split_down=2),
    "triton+pdl split4": dict(kind="triton", pdl=True, split_out=4, split_down=4),
    "triton+pdl+prefetch split2": dict(kind="triton", pdl=True, prefetch=True, split_out=2, split_down=2),
    "late triton+pdl": dict(kind="triton", pdl=True, late=True),
    "late triton+pdl+prefetch": dict(kind="triton", pdl=True, prefetch=True, late=True),
    "late triton+pdl+prefetch split2": dict(kind="triton", pdl=True, prefetch=True, late=True, split_out=2, split_down=2),
    "late triton+pdl+prefetch split4": dict(kind="triton", pdl=True, prefetch=True, late=True, split_out=4, split_down=4),
    "late pdl gemv only, prefetch split2": dict(kind="triton", pdl=True, small_pdl=False, prefetch=True, late=True, split_out=2, split_down=2),
    "cublas again": dict(kind="cublas"),
}
per_layer_bytes = sum(n * k * 2 for n, k in SHAPES.values())
results, ref = {}, None
for name, kw in VARIANTS.items():
    try:
        run, x = make(**kw)
        g, us = time_graph(run)
        g.replay(); torch.cuda.synchronize()
        out = x.float()
        if ref is None:
            ref = out.clone()
        err = float((out - ref).abs().max() / ref.abs().max())
        results[name] = {"us_per_layer": us, "TBs": per_layer_bytes / us / 1e6, "err_vs_cublas": err}
        print(f"{name:22s} {us:8.2f} us/layer  {per_layer_bytes / us / 1e6:.2f} TB/s  err {err:.2e}", flush=True)
    except Exception as e:
        results[name] = {"error": repr(e)[:300]}
        print(f"{name:22s} ERROR {repr(e)[:300]}", flush=True)
bound = per_layer_bytes / 4.8e6
print(f"layer bytes {per_layer_bytes / 1e6:.1f} MB, bound at 4.8 TB/s {bound:.2f} us")
json.dump({"layers": L, "bound_us": bound, "results": results},
          open(os.path.join(os.environ.get("OUT", "."), "pdl_micro.json"), "w"), indent=1)
