"""Detailed profile of one model's training step: top kernels and top aten ops with shapes (device time)."""
import json, os, sys, torch
sys.path.insert(0, "benchmarks")
import gpu_model, peers
from torch.profiler import profile, ProfilerActivity

name = sys.argv[1]  # e.g. "mamba2 compile+cast" or mamba_ssm_mamba2
vocab = int(sys.argv[2]) if len(sys.argv) > 2 else None
out = os.environ["OUT"]

def detailed(step, device, top=6):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    evs = prof.key_averages()
    kern = sorted([e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA or (e.self_device_time_total > 0 and not e.key.startswith(("aten::", "cuda", "Optimizer", "autograd", "Torch", "CompiledFunction", "##", "torch")))],
                  key=lambda e: -e.self_device_time_total)
    tot = sum(e.self_device_time_total for e in kern) or 1
    ops = sorted([e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::") and e.self_device_time_total > 0],
                 key=lambda e: -e.self_device_time_total)
    res = {"total_us_per_step": tot / 2,
           "kernels": [{"name": e.key[:120], "us": e.self_device_time_total / 2, "n": e.count / 2, "share": e.self_device_time_total / tot} for e in kern[:60]],
           "ops": [{"op": e.key, "shapes": str(e.input_shapes)[:200], "us": e.self_device_time_total / 2, "n": e.count / 2} for e in ops[:60]]}
    print(f"#### {name}: total {tot/2/1e3:.1f} ms per step")
    for k in res["kernels"][:40]:
        print(f"K {k['us']/1e3:8.2f} ms {k['n']:6.0f}x {k['share']:5.1%} {k['name'][:110]}")
    for o in res["ops"][:40]:
        print(f"O {o['us']/1e3:8.2f} ms {o['n']:6.0f}x {o['op']} {o['shapes'][:150]}")
    json.dump(res, open(f"{out}/prof_{name.replace(' ', '_').replace('+','_')}.json", "w"), indent=1)
    return gpu_model.profile_summary.__wrapped__(step, device, top) if hasattr(gpu_model.profile_summary, "__wrapped__") else {}

orig = gpu_model.profile_summary
def patched(step, device, top=6):
    detailed(step, device)
    return orig(step, device, top)
gpu_model.profile_summary = patched

class A: pass
a = A(); a.preset = "1b"; a.batch = 2; a.seq = 8192; a.warmup = 3; a.iters = 4; a.profile = True
if name in peers.PEERS:
    r = peers.run_row(name, a, torch.device("cuda"))
else:
    arch, variant = name.split(" ")
    r = gpu_model.train_step_throughput(arch, 2, 8192, "1b", "cuda", 3, 4, **peers.options(variant), profile=True,
                                        **({"vocab_size": vocab} if vocab else {}))
r.pop("profile", None)
print("ROW", name, json.dumps({k: v for k, v in r.items() if k in ("step_ms", "tokens_per_s", "mfu", "peak_mem_gib", "kinds")}))
