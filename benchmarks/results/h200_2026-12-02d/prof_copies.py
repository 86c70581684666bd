"""Where the copies go: one profiled hybrid_moe compile+copies step, ops by shape and by stack."""
import sys
import torch
sys.path.insert(0, "benchmarks")
import gpu_model
from torch.profiler import profile, ProfilerActivity

def detailed(step, device, **kw):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True) as prof:
        step(); torch.cuda.synchronize()
    ka = prof.key_averages(group_by_input_shape=True)
    print("#### top ops by self device time (shape)")
    for e in sorted(ka, key=lambda e: e.self_device_time_total, reverse=True)[:45]:
        print(f"{e.self_device_time_total/1e3:9.2f} ms {e.count:5d}x {e.key[:50]:<50} {str(e.input_shapes)[:150]}")
    print("#### copy-like ops by stack")
    ks = prof.key_averages(group_by_stack_n=6)
    words = ("copy", "cat", "index", "gather", "scatter", "clone", "contiguous", "_to_copy", "fill", "zero", "sort", "cumsum")
    for e in sorted((e for e in ks if any(w in e.key for w in words)), key=lambda e: e.self_device_time_total, reverse=True)[:25]:
        print(f"{e.self_device_time_total/1e3:9.2f} ms {e.count:5d}x {e.key}")
        for fr in (e.stack or [])[:6]:
            print("        ", fr)
    print("#### kernels")
    kern = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kern[ev.name] = kern.get(ev.name, 0) + ev.device_time_total
    for n, t in sorted(kern.items(), key=lambda x: -x[1])[:60]:
        print(f"{t/1e3:9.2f} ms  {n[:140]}")
    return {}

gpu_model.profile_summary = detailed
r = gpu_model.train_step_throughput(sys.argv[1] if len(sys.argv) > 1 else "hybrid_moe", compile=True, precision="copies", profile=True)
print({k: v for k, v in r.items() if k in ("step_ms", "tokens_per_s", "mfu")})
