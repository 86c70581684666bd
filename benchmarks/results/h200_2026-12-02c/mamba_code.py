"""Inductor's generated code for one 1B Mamba2 block, forward + backward (seq 8192, batch 2, bf16)."""
import torch
from pretrain.model import build_model
torch.manual_seed(0)
block = build_model("mamba2", "1b", device="cuda", pattern="M").blocks["0"].to(torch.bfloat16)
x = torch.randn(2, 8192, block.mixer_norm.weight.shape[0], device="cuda", dtype=torch.bfloat16, requires_grad=True)
f = torch.compile(block)
for _ in range(2):
    f(x, torch.arange(8192, device="cuda")).float().square().mean().backward()
torch.cuda.synchronize()
print("done")
