"""Profile 2 training steps of 1B mamba2 (gpu_model.py's setup), masking off and on (starts every ~2K tokens)."""
import os, sys
import torch
from torch.profiler import profile, ProfilerActivity
from pretrain.model import build_model
from pretrain.model.packed import PackedDocs
arch = sys.argv[1] if len(sys.argv) > 1 else "mamba2"
torch.manual_seed(0)
model = build_model(arch, "1b", device="cuda")
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
tokens = torch.randint(0, model.config.vocab_size, (2, 8193), device="cuda")
starts = torch.zeros(2, 8192, dtype=torch.bool)
for p in (0, 1500, 3000, 5200, 7000):
    starts[0, p] = True
for p in (0, 2500, 6100):
    starts[1, p] = True
out = os.environ["OUT"]
for tag, st in (("off", None), ("on", starts)):
    def step():
        docs = PackedDocs.from_starts(st.cuda(non_blocking=True)) if st is not None else None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:], docs)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    open(f"{out}/prof_{arch}_{tag}.txt", "w").write(ka.table(sort_by="cuda_time_total", row_limit=70, max_name_column_width=100))
    rows = sorted(((e.key, e.device_time_total / 2e3, e.count // 2) for e in ka if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA), key=lambda r: -r[1])
    with open(f"{out}/kernels_{arch}_{tag}.tsv", "w") as f:
        for k, ms, n in rows:
            f.write(f"{ms:.3f}\t{n}\t{k}\n")
    print(arch, tag, "kernel ms per step:", round(sum(r[1] for r in rows), 1))
