"""A/B of conv_silu_backward_pre variants at the 1B hybrid layer's shape (or tiny, interpreted on CPU).
A record of calls 1-2: it runs against the kernels it was written for, those of 9845d0e (the variants
import their helpers), from the root of a checkout of 9845d0e with this folder copied in:

    PYTHONPATH=. python benchmarks/results/h200_2026-12-02f/conv_bwd_ab.py              # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/results/h200_2026-12-02f/conv_bwd_ab.py --small
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the variants beside it
from pretrain.model.ops import conv_triton_kernels as K  # noqa: E402
import conv_bwd_variants as V  # noqa: E402

small = "--small" in sys.argv
dev = "cpu" if small else "cuda"
B, L, WIDE, D, W = (2, 300, 200, 136, 4) if small else (2, 8192, 8480, 4352, 4)
g = torch.Generator(device=dev).manual_seed(0)
rows = torch.randn(B, L, WIDE, device=dev, generator=g, dtype=torch.bfloat16)[..., 32:32 + D]
weight = (torch.randn(D, W, device=dev, generator=g, dtype=torch.bfloat16) * 0.5).contiguous()
bias = torch.randn(D, device=dev, generator=g, dtype=torch.bfloat16)
dy = torch.randn(B, L, D, device=dev, generator=g, dtype=torch.bfloat16)
docs = (torch.rand(B, L, device=dev, generator=g) < 1 / 64).cumsum(1).to(torch.int32)


def run_head(bl, bd, nw, seq):
    nl = -(-L // bl)
    dpre = torch.empty(B, L, D, device=dev, dtype=torch.bfloat16)
    dw = torch.empty(nl * B, D, W, device=dev, dtype=torch.float32)
    db = torch.empty(nl * B, D, device=dev, dtype=torch.float32)
    K.conv_silu_backward_pre[(-(-D // bd), nl, B)](
        rows, rows.stride(0), rows.stride(1), weight, bias, seq if seq is not None else rows, dy, dy.stride(0),
        dy.stride(1), dpre, dw, db, L, D, W=W, HAS_BIAS=True, HAS_DOC=seq is not None, BLOCK_L=bl, BLOCK_D=bd,
        num_warps=nw)
    return dpre, dw.sum(0), db.sum(0)


def run_nodw(bl, bd, nw, seq):
    dpre = torch.empty(B, L, D, device=dev, dtype=torch.bfloat16)
    V.bwd_pre_nodw[(-(-D // bd), -(-L // bl), B)](
        rows, rows.stride(0), rows.stride(1), weight, bias, seq if seq is not None else rows, dy, dy.stride(0),
        dy.stride(1), dpre, L, D, W=W, HAS_BIAS=True, HAS_DOC=seq is not None, BLOCK_L=bl, BLOCK_D=bd, num_warps=nw)
    return dpre, None, None


def run_loop(bl, bd, nw, steps, seq):
    nl = -(-L // (bl * steps))
    dpre = torch.empty(B, L, D, device=dev, dtype=torch.bfloat16)
    dw = torch.empty(nl * B, D, W, device=dev, dtype=torch.float32)
    db = torch.empty(nl * B, D, device=dev, dtype=torch.float32)
    V.bwd_pre_loop[(-(-D // bd), nl, B)](
        rows, rows.stride(0), rows.stride(1), weight, bias, seq if seq is not None else rows, dy, dy.stride(0),
        dy.stride(1), dpre, dw, db, L, D, W=W, HAS_BIAS=True, HAS_DOC=seq is not None, BLOCK_L=bl, BLOCK_D=bd,
        STEPS=steps, num_warps=nw)
    return dpre, dw.sum(0), db.sum(0)


def run_3d(bl, bd, nw, steps, seq):
    nl = -(-L // (bl * steps))
    dpre = torch.empty(B, L, D, device=dev, dtype=torch.bfloat16)
    dw = torch.empty(nl * B, D, W, device=dev, dtype=torch.float32)
    db = torch.empty(nl * B, D, device=dev, dtype=torch.float32)
    V.bwd_pre_3d[(-(-D // bd), nl, B)](
        rows, rows.stride(0), rows.stride(1), weight, bias, seq if seq is not None else rows, dy, dy.stride(0),
        dy.stride(1), dpre, dw, db, L, D, W=W, W_P2=triton.next_power_of_2(W), HAS_BIAS=True,
        HAS_DOC=seq is not None, BLOCK_L=bl, BLOCK_D=bd, STEPS=steps, num_warps=nw)
    return dpre, dw.sum(0), db.sum(0)


def fwd(kernel, bl, bd, nw, seq, **extra):
    y = torch.empty(B, L, D, device=dev, dtype=torch.bfloat16)
    kernel[(-(-D // bd), -(-L // bl), B)](
        rows, rows.stride(0), rows.stride(1), weight, bias, seq if seq is not None else rows, y, L, D, W=W,
        HAS_BIAS=True, HAS_DOC=seq is not None, BLOCK_L=bl, BLOCK_D=bd, num_warps=nw, **extra)
    return y, None, None


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


variants = [("head", run_head, (64, 64, 4)), ("head", run_head, (64, 32, 4)), ("head", run_head, (32, 64, 4)),
            ("head", run_head, (32, 128, 4)),
            ("nodw", run_nodw, (64, 64, 4)), ("nodw", run_nodw, (64, 32, 4))]
for steps in ((2,) if small else (16, 32, 64)):
    for tile in ((32, 64, 4),) if small else ((32, 64, 4), (32, 32, 4)):
        variants.append((f"loop{steps}", lambda bl, bd, nw, seq, s=steps: run_loop(bl, bd, nw, s, seq), tile))
    for tile in ((16, 64, 4), (32, 64, 4)) if small else ((16, 64, 4), (32, 64, 4), (32, 64, 8), (16, 128, 4), (8, 128, 4)):
        variants.append((f"3d{steps}", lambda bl, bd, nw, seq, s=steps: run_3d(bl, bd, nw, s, seq), tile))

results = []
for seq in (None, docs):
    want = fwd(K.conv_silu_forward, 64, 64, 4, seq)
    for kname, kern, tile, extra in (("fwd", K.conv_silu_forward, (64, 64, 4), {}),
                                     ("fwd3d", V.fwd_3d, (64, 64, 4), {"W_P2": 4}),
                                     ("fwd3d", V.fwd_3d, (32, 64, 4), {"W_P2": 4}),
                                     ("fwd3d", V.fwd_3d, (32, 128, 4), {"W_P2": 4})):
        got = fwd(kern, *tile, seq, **extra)
        ms = float("nan") if small else __import__("gpu_model").cuda_time(lambda: fwd(kern, *tile, seq, **extra), iters=20)
        print(f"{kname:<8} {str(tile):<14} docs={seq is not None!s:<5} {ms:.3f} ms  err {rel(got[0], want[0]):.1e}", flush=True)
    want = run_head(64, 64, 4, seq)
    for name, fn, tile in variants:
        try:
            got = fn(*tile, seq)
            err = [rel(a, b) for a, b in zip(got, want) if a is not None]
            if small:
                ms = float("nan")
            else:
                from gpu_model import cuda_time
                ms = cuda_time(lambda: fn(*tile, seq), warmup=3, iters=20)
            results.append({"variant": name, "tile": tile, "docs": seq is not None, "ms": ms, "err": err})
        except Exception as e:  # noqa: BLE001
            results.append({"variant": name, "tile": tile, "docs": seq is not None, "error": repr(e)[:300]})
        r = results[-1]
        print(f"{r['variant']:<8} {str(r['tile']):<14} docs={r['docs']!s:<5} "
              + (f"{r['ms']:.3f} ms  err {['%.1e' % e for e in r['err']]}" if "ms" in r else r["error"]), flush=True)
if not small:
    out = os.environ.get("OUT", ".")
    json.dump(results, open(f"{out}/conv_bwd_ab.json", "w"), indent=1)
    # bytes: x + dy read, dpre written
    print("GB/s at 3 passes of", B * L * D * 2 / 1e6, "MB each")
