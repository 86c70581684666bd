"""Gated norm at the 1B Mamba2 layer's shape ([2, 8192, 4096] bf16, z sliced from 8480-wide rows):
our kernels (forward; backward at several programs per SM and warps) against the compiled reference."""
import json, os, sys
import torch
from pretrain.model.ops.gated_norm import gated_rms_norm_reference
from pretrain.model.ops import gated_norm_triton as gt

def bench(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]

g = torch.Generator(device="cuda").manual_seed(0)
y = torch.randn(2, 8192, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
z = torch.randn(2, 8192, 8480, device="cuda", generator=g, dtype=torch.bfloat16)[..., :4096]
w = torch.rand(4096, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
dout = torch.randn(2, 8192, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
rows = []
out, rstd = gt.gated_norm_triton(y, z, w, 1e-5, 1)
rows.append(("triton forward", bench(lambda: gt.gated_norm_triton(y, z, w, 1e-5, 1))))
K = gt._kernels()
sms = torch.cuda.get_device_properties(0).multi_processor_count
y2, z2, d2 = y.reshape(-1, 4096), z.reshape(-1, 4096), dout.reshape(-1, 4096)
dy, dz = torch.empty_like(y), torch.empty_like(y)
for slots in (1, 2, 4, 8):
    for warps in (4, 8, 16):
        per = -(-16384 // (slots * sms)); programs = -(-16384 // per)
        dw = torch.zeros(programs, 4096, device="cuda")
        f = lambda: K.gated_norm_backward[(programs, 1)](d2, 4096, y2, 4096, z2, 8480, w, rstd, dy, dz, dw, 16384, 4096, 4096, per, BLOCK=4096, num_warps=warps)
        rows.append((f"triton backward slots/SM {slots} warps {warps}", bench(f)))
want = gt.gated_norm_backward_triton(dout, y, z, w, rstd)
ref = torch.compile(lambda y, z, w: gated_rms_norm_reference(y, z, w, 1e-5, 1))
leaves = [t.detach().requires_grad_() for t in (y, z, w)]
rows.append(("compiled reference forward", bench(lambda: ref(*leaves))))
def fb():
    o = ref(*leaves); torch.autograd.grad(o, leaves, dout)
rows.append(("compiled reference forward+backward", bench(fb)))
o = ref(*leaves); gy, gz, gw = torch.autograd.grad(o, leaves, dout)
err = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(want, (gy, gz, gw))]
err.append(((out.float() - o.float()).norm() / o.float().norm()).item())
for name, ms in rows: print(f"{name:45s} {ms:.3f} ms")
print("rel err vs compiled reference (dy, dz, dw, out):", ["%.1e" % e for e in err])
json.dump({"rows": rows, "err": err}, open(os.path.join(os.environ.get("OUT", "/tmp"), "norm_micro.json"), "w"))
