"""decode_attention_triton's partial + combine at the 1B llama and intra-hybrid decode shapes (batch 4,
2K and 8K slots): configs of slots per program, warps, stages. CUDA graphs over 8 caches (no L2 reuse)."""
import itertools, json, math, os, torch
from pretrain.model.ops import decode_attention_triton_kernels as K
from pretrain.model.ops.decode_attention import decode_attention

def pow2(n, least=16):
    return max(least, 1 << (n - 1).bit_length())

def run(q, k, v, qp, kp, slots, bs, warps, stages, bufs):
    b, h, lq, dq = q.shape; n, _, kv, c, dv = v.shape; rep = h // kv; rows = rep * lq
    split = max(1, c // slots)
    m, l, o, out = bufs
    K.decode_attention_partial[(n * split, b * kv)](q, q.stride(0), q.stride(1), q.stride(2), k, v, kp, qp, m, l, o, b, kv, rep, lq, c, split,
        dq, dv, 1 / math.sqrt(dq), 0, 0, HAS_WINDOW=False, PRECISION="tf32", BLOCK_R=pow2(rows), BLOCK_S=bs,
        BLOCK_DQ=pow2(dq), BLOCK_DV=pow2(dv), num_warps=warps, num_stages=stages)
    K.decode_attention_combine[(b * kv * rows,)](m, l, o, out, n * split, b, kv, rep, lq, dv, BLOCK_C=min(32, pow2(n * split, 2)),
        BLOCK_DV=pow2(dv), num_warps=4)
    return out

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
        for slots, bs, warps, stages in itertools.product((64, 128, 256), (32, 64), (2, 4, 8), (1, 2, 3)):
            split = max(1, 256 // slots); rows = h // kv
            bufs = [(torch.empty(n * split, 4, kv, rows, device="cuda"), torch.empty(n * split, 4, kv, rows, device="cuda"),
                     torch.empty(n * split, 4, kv, rows, dv, device="cuda"), torch.empty(4, h, 1, dv, device="cuda", dtype=torch.bfloat16))
                    for _ in caches]
            try:
                got = run(q, *caches[0], qp, kp, slots, bs, warps, stages, bufs[0]).float()
                err = float((got - want).abs().max())
                def all_():
                    for (kc, vc), bf in zip(caches, bufs):
                        run(q, kc, vc, qp, kp, slots, bs, warps, stages, bf)
                all_(); torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    all_()
                g.replay(); torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(10):
                    g.replay()
                e1.record(); torch.cuda.synchronize()
                us = e0.elapsed_time(e1) * 1e3 / 80
                res.append(dict(shape=name, slots_total=S, slots=slots, bs=bs, warps=warps, stages=stages, us=us, err=err, TBs=mb / us))
            except Exception as e:
                res.append(dict(shape=name, slots_total=S, slots=slots, warps=warps, stages=stages, error=str(e)[:120]))
        ok = sorted([r for r in res if r["shape"] == name and r["slots_total"] == S and "us" in r and r["err"] < 0.05], key=lambda r: r["us"])
        cur = [r for r in ok if r["slots"] == 256 and r["bs"] == 64 and r["warps"] == 4 and r["stages"] == 3]
        print(f"{name} {S}: {mb:.1f} MB, one program a chunk (256 slots, blocks of 64, 4 warps, 3 stages) {cur[0]['us'] if cur else float('nan'):.1f} us; best: " +
              "; ".join(f"{r['slots']}/{r['bs']}/{r['warps']}w/{r['stages']}s {r['us']:.1f} us {r['TBs']:.2f} TB/s" for r in ok[:4]), flush=True)
        del caches
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "attn_micro.json"), "w"), indent=0)
