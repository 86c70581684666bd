"""torch.argmax against greedy_tokens over [4, 128256] logits, each replayed 200x in a CUDA graph."""
import json, os, sys
import torch
from pretrain.model.sampling import greedy_tokens

rows = []
for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(4, 128256, device="cuda", dtype=dtype)
    fns = {"torch.argmax": lambda: x.argmax(-1, keepdim=True), "greedy_tokens": lambda: greedy_tokens(x),
           "compiled greedy_tokens": torch.compile(lambda: greedy_tokens(x))}
    for name, fn in fns.items():
        assert torch.equal(fn(), x.argmax(-1, keepdim=True))
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(200): fn()
        g.replay(); torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        rows.append({"dtype": str(dtype), "fn": name, "us": a.elapsed_time(b) * 1000 / 200})
json.dump(rows, open(os.path.join(os.environ["OUT"], "argmax_micro.json"), "w"), indent=1)
for r in rows: print(f"{r['dtype']:16s} {r['fn']:24s} {r['us']:7.1f} us")
