"""Does torch 2.11's Inductor compile the reference SSD scan on CUDA? Which part fails?"""
import torch
from pretrain.model.ops.ssd import segsum, ssd_scan_reference

def attempt(name, fn, *args):
    torch._dynamo.reset()
    try:
        out = torch.compile(fn)(*args)
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:
            out.float().sum().backward()
        ref = fn(*args)
        ref = ref[0] if isinstance(ref, tuple) else ref
        print(f"{name}: ok, max diff {(out.float() - ref.float()).abs().max().item():.3g}")
    except Exception as e:
        print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}")

a = torch.randn(2, 4, 256, 16, device="cuda")
attempt("cumsum over a permuted view", lambda t: torch.cumsum(t.permute(0, 3, 1, 2), -1), a)
attempt("cumsum over a contiguous copy", lambda t: torch.cumsum(t.permute(0, 3, 1, 2).contiguous(), -1), a)
attempt("cumsum over dim 2, then permuted", lambda t: torch.cumsum(t, 2).permute(0, 3, 1, 2), a)
attempt("segsum", segsum, a.permute(0, 3, 1, 2))
for (b, l, h, p, n, q) in [(2, 1024, 16, 64, 128, 256), (2, 8192, 32, 64, 128, 256)]:
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    dt = (torch.rand(b, l, h, device="cuda", generator=g) * 0.1).requires_grad_()
    A = -torch.rand(h, device="cuda", generator=g)
    B = torch.randn(b, l, 1, n, device="cuda", dtype=torch.bfloat16, generator=g)
    C = torch.randn(b, l, 1, n, device="cuda", dtype=torch.bfloat16, generator=g)
    attempt(f"ssd_scan_reference b{b} l{l} h{h}", lambda *t: ssd_scan_reference(*t, chunk_size=q), x, dt, A, B, C)
