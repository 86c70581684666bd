"""grouped GEMM fwd+bwd at 1B hybrid_moe's shape: torch's own autograd vs the project's op vs layouts."""
import os, sys, statistics
sys.path.insert(0, os.getcwd())
import torch
import pretrain.model.ops.library  # registers pretrain::grouped_mm
def t(fn, n=20):
    for _ in range(3): fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
E, d, h, T = 8, 2048, 4096, 16384
torch.manual_seed(0)
ids = torch.randint(0, E, (T,), device="cuda")
counts = torch.bincount(ids, minlength=E)
offs = counts.cumsum(0).to(torch.int32)
x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(E, d, h, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
dy = torch.randn(T, h, device="cuda", dtype=torch.bfloat16)
wd = (torch.randn(E, h, d, device="cuda") * 0.02).to(torch.bfloat16)
dyd = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
xh = torch.randn(T, h, device="cuda", dtype=torch.bfloat16)
res = {}
res["native fwd+bwd (w1 shape)"] = t(lambda: torch._grouped_mm(x, w, offs=offs).backward(dy))
res["pretrain op fwd+bwd"] = t(lambda: torch.ops.pretrain.grouped_mm(x, w, offs.long()).backward(dy))
res["fwd"] = t(lambda: torch._grouped_mm(x.detach(), w.detach(), offs=offs))
res["dx: w.mT view"] = t(lambda: torch._grouped_mm(dy, w.detach().mT, offs=offs))
res["dx: w.mT.contiguous()"] = t(lambda: torch._grouped_mm(dy, w.detach().mT.contiguous(), offs=offs))
res["dw: x.t() @ dy"] = t(lambda: torch._grouped_mm(x.detach().t(), dy, offs=offs))
res["dw: (dy.t() @ x).mT"] = t(lambda: torch._grouped_mm(dy.t(), x.detach(), offs=offs).mT)
res["w2 fwd (h->d)"] = t(lambda: torch._grouped_mm(xh, wd, offs=offs))
res["w2 dx view"] = t(lambda: torch._grouped_mm(dyd, wd.mT, offs=offs))
res["w2 dx contiguous"] = t(lambda: torch._grouped_mm(dyd, wd.mT.contiguous(), offs=offs))
res["w2 dw x.t()@dy"] = t(lambda: torch._grouped_mm(xh.t(), dyd, offs=offs))
for k, v in res.items():
    print(f"{k:<30}{v:8.3f} ms")
