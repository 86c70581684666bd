"""Mamba2's causal conv + SiLU on the GPU: our Triton kernels (ops/conv_triton.py) against the
compiled reference (the shifted products, `conv._conv_taps`, as torch.compile fuses them) and the
eager reference (cuDNN's depthwise conv), forward and forward + backward.

    PYTHONPATH=. python benchmarks/conv_kernel.py [--tiles forward=64x64x4,backward_pre=32x64x4x512 ...]
                                                  [--out conv.json]

Shape of the 1B mamba2 layer (sequence 8192, batch 2): rows [2, 8192, 4352] of x, B and C, a
column slice of the [2, 8192, 8480] projection output, bf16, with and without document ids.
Each `--tiles` times the Triton kernels with other tiles (`conv_triton.TILES`: kernel=positions x
channels x warps per program, for backward_pre optionally x the positions one program walks; the
rest stays default) and checks their outputs and gradients against the default tiles'. The default
tiles are timed again after the others (the first timings of a process can run slow).
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
from gpu_model import cuda_time, require_cuda  # noqa: E402

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
    dy = torch.randn(B, L, D, device="cuda", generator=g, dtype=torch.bfloat16)  # rows, as the mixer's split hands it back
    return rows.transpose(1, 2), weight, bias, seq_idx, dy.transpose(1, 2)


def outputs(conv, x, weight, bias, seq_idx, dy) -> list[torch.Tensor]:
    """y and the gradients of x, weight and bias."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = conv(*leaves, seq_idx)
    return [y, *torch.autograd.grad(y, leaves, dy)]


def time_conv(conv, x, weight, bias, seq_idx, dy) -> dict[str, float]:
    def forward():
        with torch.no_grad():
            for _ in range(REPEAT):
                conv(x, weight, bias, seq_idx)

    def forward_backward():
        for _ in range(REPEAT):
            outputs(conv, x, weight, bias, seq_idx, dy)

    fwd, fwd_bwd = cuda_time(forward) / REPEAT, cuda_time(forward_backward) / REPEAT
    tensor_bytes = B * L * D * 2
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "fwd_GBps": 2 * tensor_bytes / fwd / 1e6,
            "fwd_bwd_GBps": 5 * tensor_bytes / fwd_bwd / 1e6}


def parse_tile(spec: str) -> tuple[str, dict[str, int]]:
    """'backward_pre=16x64x4x1024' -> ('backward_pre', the default tile with those sizes): positions x
    channels x warps per program, and for backward_pre optionally the positions a program walks."""
    kernel, _, sizes = spec.partition("=")
    if kernel not in conv_triton.TILES:
        raise SystemExit(f"--tiles {spec}: kernel {kernel!r} is not one of {', '.join(conv_triton.TILES)}")
    fields = ("BLOCK_L", "BLOCK_D", "num_warps", "positions")[:4 if kernel == "backward_pre" else 3]
    values = sizes.split("x")
    if not 3 <= len(values) <= len(fields) or not all(v.isdigit() for v in values):
        raise SystemExit(f"--tiles {spec}: give {'x'.join(fields[:3])}" + ("[xpositions]" if len(fields) == 4 else "")
                         + " as whole numbers, e.g. 32x64x4")
    return kernel, {**conv_triton.TILES[kernel], **dict(zip(fields, map(int, values)))}


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((u.float() - v.float()).norm() / v.float().norm()).item() for u, v in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", action="append", default=[],
                        help="other tiles, kernel=positions x channels x warps[x positions walked, backward_pre]: forward=64x64x4,backward_pre=32x64x4x512")
    parser.add_argument("--out", default="conv_kernel.json")
    args = parser.parse_args()
    require_cuda("conv_kernel.py", "it times the Triton kernels against Inductor's and cuDNN's")

    def triton_conv(x, w, b, seq_idx):
        return causal_conv1d(x, w, b, None, seq_idx)

    compiled_taps = torch.compile(lambda x, w, b, seq_idx: _conv_taps(x, None, w, b, seq_idx))

    def eager_reference(x, w, b, seq_idx):
        with reference_kernels():
            return causal_conv1d(x, w, b, None, seq_idx)

    default = conv_triton.TILES
    others = [(spec, {**default, **dict(map(parse_tile, spec.split(",")))}) for spec in args.tiles]
    variants = [("default", default), *others] + ([("default, again", default)] if others else [])
    rows = []
    for docs in (False, True):
        case = inputs(docs)
        want = outputs(triton_conv, *case)
        for name, tiles in variants:
            conv_triton.TILES = tiles
            rows.append({"kernel": name, "docs": docs, "max_rel_diff": max_rel_diff(outputs(triton_conv, *case), want),
                         **time_conv(triton_conv, *case)})
        conv_triton.TILES = default
        for name, conv in (("compiled reference", compiled_taps), ("eager reference", eager_reference)):
            rows.append({"kernel": name, "docs": docs, "max_rel_diff": max_rel_diff(outputs(conv, *case), want),
                         **time_conv(conv, *case)})
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "shape": [B, L, D], "width": W, "rows": rows}, indent=2))
    print(f"{'kernel':<50} {'docs':<5} {'fwd ms':>8} {'GB/s':>7} {'fwd+bwd ms':>11} {'GB/s':>7} {'vs default':>10}")
    for r in rows:
        print(f"{r['kernel']:<50} {str(r['docs']):<5} {r['fwd_ms']:>8.3f} {r['fwd_GBps']:>7.0f} "
              f"{r['fwd_bwd_ms']:>11.3f} {r['fwd_bwd_GBps']:>7.0f} {r['max_rel_diff']:>10.1e}")


if __name__ == "__main__":
    main()
