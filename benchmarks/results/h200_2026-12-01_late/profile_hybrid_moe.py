"""Profile 2 training steps of 1B hybrid_moe (gpu_model.py's setup) with the tree given as argv[1]."""
import os, sys
sys.path.insert(0, os.path.abspath(sys.argv[1]))
import torch
from pretrain.model import build_model
tag = sys.argv[2]
torch.manual_seed(0)
model = build_model("hybrid_moe", "1b", device="cuda")
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
tokens = torch.randint(0, model.config.vocab_size, (2, 8193), device="cuda")
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for moe in model.moe_layers():
        moe.update_bias()
for _ in range(3):
    step()
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
out = os.environ["OUT"]
ka = prof.key_averages()
open(f"{out}/prof_{tag}.txt", "w").write(ka.table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
rows = sorted(((e.key, e.device_time_total / 2e3, e.count // 2) for e in ka if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA), key=lambda r: -r[1])
with open(f"{out}/kernels_{tag}.tsv", "w") as f:
    for k, ms, n in rows:
        f.write(f"{ms:.3f}\t{n}\t{k}\n")
print(tag, "kernel ms per step:", round(sum(r[1] for r in rows), 1))
