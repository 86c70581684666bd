"""decode_attention_triton at the 1B llama and intra-hybrid shapes (batch 4, bf16, StaticKV chunks of 256),
2K and 8K slots: `api` times the public function of the tree on PYTHONPATH; `sweep` (new tree) times
partial+combine configs. CUDA graphs over 8 caches (no L2 reuse)."""
import itertools, json, math, os, sys, torch
from pretrain.model.ops.decode_attention_triton import decode_attention_triton, _pow2
from pretrain.model.ops.decode_attention import decode_attention

mode, tag = sys.argv[1], sys.argv[2]

def timed(fn):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / 20 / 8

def sweep_call(q, k, v, qp, kp, bs, warps, stages):
    from pretrain.model.ops import decode_attention_triton_kernels as K
    b, h, lq, dq = q.shape; n, _, kv, c, dv = v.shape; rep = h // kv; rows = rep * lq
    m = torch.empty(n, b, kv, rows, device="cuda"); l = torch.empty_like(m)
    o = torch.empty(n, b, kv, rows, dv, device="cuda"); out = torch.empty(b, h, lq, dv, device="cuda", dtype=v.dtype)
    def f():
        K.decode_attention_partial[(n, b * kv)](q, q.stride(0), q.stride(1), q.stride(2), k, v, kp, qp, m, l, o, b, kv, rep, lq, c,
            1 / math.sqrt(dq), 0, 0, DQ=dq, DV=dv, HAS_WINDOW=False, PRECISION="tf32", BLOCK_R=_pow2(rows), BLOCK_S=bs,
            BLOCK_DQ=_pow2(dq), BLOCK_DV=_pow2(dv), num_warps=warps, num_stages=stages)
        K.decode_attention_combine[(b * kv * rows,)](m, l, o, out, n, b, kv, rep, lq, DV=dv, BLOCK_C=min(32, _pow2(n, 2)),
            BLOCK_DV=_pow2(dv), num_warps=4)
        return out
    return f

res = []
for name, h, kv, dq, dv in (("llama", 32, 8, 64, 64), ("intra", 16, 4, 72, 144)):
    for S in (2048, 8192):
        n = S // 256
        caches = [(torch.randn(n, 4, kv, 256, dq, device="cuda", dtype=torch.bfloat16),
                   torch.randn(n, 4, kv, 256, dv, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
        q = torch.randn(4, 1, h, dq, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        kp = torch.arange(S, device="cuda"); qp = torch.tensor([S - 1], device="cuda")
        want = decode_attention(q, *caches[0], qp, kp).float()
        mb = (caches[0][0].numel() + caches[0][1].numel()) * 2 / 1e6
        if mode == "api":
            err = float((decode_attention_triton(q, *caches[0], qp, kp).float() - want).abs().max())
            us = timed(lambda: [decode_attention_triton(q, kc, vc, qp, kp) for kc, vc in caches])
            res.append(dict(tree=tag, shape=name, slots=S, us=us, TBs=mb / us, err=err))
            print(f"{tag} {name} {S}: {us:.2f} us, {mb / us:.2f} TB/s, err {err:.3g}", flush=True)
        else:
            rows = []
            for bs, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
                try:
                    fs = [sweep_call(q, kc, vc, qp, kp, bs, warps, stages) for kc, vc in caches]
                    err = float((fs[0]().float() - want).abs().max())
                    us = timed(lambda: [f() for f in fs])
                    rows.append(dict(shape=name, slots=S, bs=bs, warps=warps, stages=stages, us=us, err=err, TBs=mb / us))
                except Exception as e:
                    rows.append(dict(shape=name, slots=S, bs=bs, warps=warps, stages=stages, error=str(e)[:100]))
            res += rows
            ok = sorted([r for r in rows if "us" in r and r["err"] < 0.05], key=lambda r: r["us"])
            cur = [r for r in ok if (r["bs"], r["warps"], r["stages"]) == (64, 4, 3)]
            print(f"sweep {name} {S}: current 64/4w/3s {cur[0]['us'] if cur else float('nan'):.2f} us; best " +
                  "; ".join(f"{r['bs']}/{r['warps']}w/{r['stages']}s {r['us']:.2f} us {r['TBs']:.2f} TB/s" for r in ok[:3]), flush=True)
        del caches
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), f"attn_{mode}_{tag}.json"), "w"), indent=0)
