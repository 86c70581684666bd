"""Loss fwd+bwd at the 1B step's shape: old PyTorch per-chunk path vs the Triton step, chunk sizes."""
import json, os, sys, torch
from pretrain.model.ops import cross_entropy as ce
from pretrain.model.ops import softmax_xent_triton as sx
sys.path.insert(0, "benchmarks")
from gpu_model import cuda_time
h = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(128256, 2048, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
t = torch.randint(0, 128256, (16384,), device="cuda")
def run():
    ce.chunked_cross_entropy(h, w, t).backward()
rows = {}
real_sx, real_acc = ce.softmax_xent, ce._accumulate_product
def old_acc(acc, a, b): acc += (a @ b).to(acc.dtype)
for name, sxf, acc, chunk in [("old (pytorch step, bf16 product + add)", sx.softmax_xent_reference, old_acc, 1 << 27),
                              ("triton step, old add", real_sx, old_acc, 1 << 27),
                              ("triton step + addmm fp32, 2^27", real_sx, real_acc, 1 << 27),
                              ("triton step + addmm fp32, 2^28", real_sx, real_acc, 1 << 28),
                              ("triton step + addmm fp32, 2^29", real_sx, real_acc, 1 << 29)]:
    ce.softmax_xent, ce._accumulate_product, ce.CHUNK_LOGITS = sxf, acc, chunk
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time(run, 2, 5)
    rows[name] = {"ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(f"{name:<45}{ms:>8.2f} ms {rows[name]['peak_gib']:>6.1f} GiB", flush=True)
json.dump(rows, open(os.environ["OUT"] + "/ce_micro.json", "w"), indent=1)
