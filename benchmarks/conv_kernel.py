"""Mamba2's causal conv + SiLU on the GPU: our Triton kernels (ops/conv_triton.py) against the
compiled reference (the shifted products, `conv._conv_taps`, as torch.compile fuses them) and the
eager reference (cuDNN's depthwise conv), forward and forward + backward.

    PYTHONPATH=. python benchmarks/conv_kernel.py [--blocks 64x64,32x128] [--out conv.json]

Shape of the 1B mamba2 layer (sequence 8192, batch 2): rows [2, 8192, 4352] of x, B and C, a
column slice of the [2, 8192, 8480] projection output, bf16, with and without document ids.
`--blocks` times the Triton kernels at other tile sizes (positions x channels per program).
GB/s counts the passes each direction must make at least: forward reads x and writes y, the
backward reads x and dy and writes dx. Median of 10 runs after 3 (CUDA events), each of 10 calls
in a row (a single call's time would include the host's dispatch). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import cuda_time  # noqa: E402

from pretrain.model.ops import causal_conv1d, reference_kernels  # noqa: E402
from pretrain.model.ops import conv_triton  # noqa: E402
from pretrain.model.ops.conv import _conv_taps  # noqa: E402

B, L, WIDE, D, W = 2, 8192, 8480, 4352, 4
REPEAT = 10  # calls per timed run: the GPU queue stays full, so the host's dispatch time hides


def inputs(docs: bool) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.randn(B, L, WIDE, device="cuda", generator=g, dtype=torch.bfloat16)[..., 4096:4096 + D]
    weight = torch.randn(D, W, device="cuda", generator=g, dtype=torch.bfloat16) * 0.5
    bias = torch.randn(D, device="cuda", generator=g, dtype=torch.bfloat16)
    seq_idx = (torch.rand(B, L, device="cuda", generator=g) < 1 / 1024).cumsum(1) if docs else None
    return rows.transpose(1, 2), weight, bias, seq_idx


def time_conv(conv, x, weight, bias, seq_idx) -> dict[str, float]:
    leaves = [t.detach().clone().requires_grad_() for t in (weight, bias)]
    xg = x.detach().requires_grad_()
    dy = torch.randn(B, D, L, device="cuda", dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            for _ in range(REPEAT):
                conv(x, weight, bias, seq_idx)

    def forward_backward():
        for _ in range(REPEAT):
            conv(xg, *leaves, seq_idx).backward(dy)

    fwd, fwd_bwd = cuda_time(forward) / REPEAT, cuda_time(forward_backward) / REPEAT
    tensor_bytes = B * L * D * 2
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "fwd_GBps": 2 * tensor_bytes / fwd / 1e6,
            "fwd_bwd_GBps": 5 * tensor_bytes / fwd_bwd / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="", help="extra Triton tile sizes, e.g. 32x128,128x32")
    parser.add_argument("--out", default="conv_kernel.json")
    args = parser.parse_args()

    def triton_conv(x, w, b, seq_idx):
        return causal_conv1d(x, w, b, None, seq_idx)

    compiled_taps = torch.compile(lambda x, w, b, seq_idx: _conv_taps(x, None, w, b, seq_idx))

    def eager_reference(x, w, b, seq_idx):
        with reference_kernels():
            return causal_conv1d(x, w, b, None, seq_idx)

    default = (conv_triton.BLOCK_L, conv_triton.BLOCK_D)
    blocks = [default] + [tuple(int(v) for v in s.split("x")) for s in args.blocks.split(",") if s]
    rows = []
    for docs in (False, True):
        case = inputs(docs)
        for block_l, block_d in blocks:
            conv_triton.BLOCK_L, conv_triton.BLOCK_D = block_l, block_d
            rows.append({"kernel": f"triton {block_l}x{block_d}", "docs": docs, **time_conv(triton_conv, *case)})
        conv_triton.BLOCK_L, conv_triton.BLOCK_D = default
        rows.append({"kernel": "compiled reference", "docs": docs, **time_conv(compiled_taps, *case)})
        rows.append({"kernel": "eager reference", "docs": docs, **time_conv(eager_reference, *case)})
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "shape": [B, L, D], "width": W, "rows": rows}, indent=2))
    print(f"{'kernel':<22} {'docs':<5} {'fwd ms':>8} {'GB/s':>7} {'fwd+bwd ms':>11} {'GB/s':>7}")
    for r in rows:
        print(f"{r['kernel']:<22} {str(r['docs']):<5} {r['fwd_ms']:>8.3f} {r['fwd_GBps']:>7.0f} "
              f"{r['fwd_bwd_ms']:>11.3f} {r['fwd_bwd_GBps']:>7.0f}")


if __name__ == "__main__":
    main()
