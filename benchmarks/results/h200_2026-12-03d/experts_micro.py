"""Routed experts' SwiGLU forward + backward at 1B hybrid_moe's shape: bf16 grouped_mm against two
float8 variants kept beside this script (forward + input gradient in float8; everything in float8 with
rows padded to 16 per expert), eager and compiled; CUDA events, median of 20; a kernel profile of the
compiled float8 ones. A record of the eleventh session (docs/benchmarks.md), run from the repository
root: OUT=out PYTHONPATH=. python benchmarks/results/h200_2026-12-03d/experts_micro.py"""
import json, os, sys
from pathlib import Path

import torch, torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain.model.ops import grouped_mm
from grouped_mm_float8_fwd_dgrad import grouped_mm_float8
from grouped_mm_float8_full import AlignedGroups, grouped_mm_float8 as full_mm

t, d, h, e = 16384, 2048, 4096, 8
g = torch.Generator(device="cuda").manual_seed(0)
ids = torch.randint(0, e, (t,), device="cuda", generator=g)
counts = torch.bincount(ids, minlength=e)
xs = torch.randn(t, d, device="cuda", generator=g).bfloat16()
ws = [(torch.randn(e, a, b, device="cuda", generator=g) / a**0.5).bfloat16().requires_grad_()
      for a, b in ((d, h), (d, h), (h, d))]

def bf16(x, counts, w1, w3, w2):
    o = counts.cumsum(0)
    return grouped_mm(F.silu(grouped_mm(x, w1, o)) * grouped_mm(x, w3, o), w2, o)

def fp8_full(x, counts, w1, w3, w2):
    gr = AlignedGroups.of(counts, x.shape[0]); x = gr.pad(x); o = gr.offsets
    mm = full_mm
    return gr.unpad(mm(F.silu(mm(x, w1, o)) * mm(x, w3, o), w2, o))

def fp8(x, counts, w1, w3, w2):
    o = counts.cumsum(0); mm = grouped_mm_float8
    return mm(F.silu(mm(x, w1, o)) * mm(x, w3, o), w2, o)

def profile(fn, name):
    x = xs.clone().requires_grad_(); dy = torch.randn(t, d, device="cuda").bfloat16()
    for _ in range(3): fn(x, counts, *ws).backward(dy)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5): fn(x, counts, *ws).backward(dy)
        torch.cuda.synchronize()
    print(f"--- {name}: top kernels (us per iteration)")
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:18]
    for e in ev:
        print(f"{e.self_device_time_total / 5:9.0f} {e.count // 5:4d}  {e.key[:110]}")

def timeit(fn):
    x = xs.clone().requires_grad_()
    dy = torch.randn(t, d, device="cuda").bfloat16()
    for _ in range(3):
        fn(x, counts, *ws).backward(dy)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(x, counts, *ws).backward(dy); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]

rows = {}
for name, fn in (("bf16", bf16), ("fp8 fwd+dgrad", fp8), ("fp8 full", fp8_full)):
    try:
        rows[f"{name} eager"] = timeit(fn)
        torch._dynamo.reset()
        cf = torch.compile(fn)
        rows[f"{name} compiled"] = timeit(cf)
        if name != "bf16":
            profile(cf, name + " compiled")
    except Exception as e:
        print(name, "failed:", repr(e)[:600])
flops = 3 * 3 * 2 * t * d * h
json.dump(rows, open(os.environ.get("OUT", ".") + "/experts_micro.json", "w"), indent=1)
print(f"{'path':<22}{'ms fwd+bwd':>11}{'TFLOP/s':>9}")
for k, v in rows.items():
    print(f"{k:<22}{v:>11.3f}{flops / v / 1e9:>9.0f}")
