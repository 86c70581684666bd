"""Ordered kernel sequence of one compiled CUDA-graph decode step (1B, batch 4, bf16, 2K)."""
import json, os, sys, time
from collections import Counter
import torch
from torch.profiler import ProfilerActivity, profile
from pretrain.model import build_model
from pretrain.model.decode import Decoder
from pretrain.model.ops import reference_kernels

out = os.environ["OUT"]
res = {}
for arch in sys.argv[1].split(","):
    torch.manual_seed(0)
    model = build_model(arch, "1b", device="cuda").to(torch.bfloat16).eval()
    print(arch, model.config.pattern, flush=True)
    prompt = torch.randint(0, model.config.vocab_size, (4, 512), device="cuda")
    with torch.no_grad():
        dec = Decoder(model, 4, 2100, compile=True)
        with reference_kernels():
            nxt = dec.prefill(prompt).argmax(-1, keepdim=True)
        dec.cache.pretend_length(2047)
        dec.capture_until(2047 + 30, greedy=False)
        for _ in range(5):
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    seq = [(e.name[:90], e.time_range.end - e.time_range.start, e.time_range.start) for e in evs]
    t_first, t_last = seq[0][2], evs[-1].time_range.end
    busy = sum(s[1] for s in seq)
    res[arch] = {"pattern": model.config.pattern, "step_ms": ms, "kernels": len(seq), "busy_us": busy,
                 "span_us": t_last - t_first, "seq": [(n, d) for n, d, _ in seq]}
    print(f"{arch}: step {ms:.3f} ms, {len(seq)} kernels, busy {busy:.0f} us, span {t_last - t_first:.0f} us", flush=True)
    agg = Counter()
    for n, d, _ in seq:
        agg[n] += d
    for n, d in agg.most_common(25):
        print(f"   {d:8.1f} us  {sum(1 for s in seq if s[0] == n):4d}x  {n}")
    del dec, model
    torch._dynamo.reset(); torch.cuda.empty_cache()
json.dump(res, open(f"{out}/decode_trace.json", "w"), indent=0)
