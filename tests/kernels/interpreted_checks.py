"""Checks of our Triton kernels against their PyTorch references, for Triton's CPU interpreter:
`TRITON_INTERPRET=1 python tests/kernels/interpreted_checks.py conv|gated_norm|softmax_xent|adamw|decode_attention|kv_write|mamba2_step`
exits
non-zero on a mismatch. Inputs are fp32 (the interpreter casts to bf16 by truncation, not by
rounding as the GPU does, so 16-bit outputs are compared to within one unit in the last place)."""
import sys

import torch

from pretrain.model.ops.conv import causal_conv1d_reference
from pretrain.model.ops.conv_triton import conv_silu_backward_triton, conv_silu_triton
from pretrain.model.ops.decode_attention import decode_attention
from pretrain.model.ops.decode_attention_triton import decode_attention_triton, kv_write_triton
from pretrain.model.ops.gated_norm import gated_rms_norm_reference
from pretrain.model.ops.gated_norm_triton import gated_norm_backward_triton, gated_norm_triton
from pretrain.model.ops.mamba2_step import mamba2_step_reference
from pretrain.model.ops.mamba2_step_triton import mamba2_step_triton
from pretrain.model.ops.softmax_xent_triton import softmax_xent_reference, softmax_xent_triton
from pretrain.model.static_cache import EMPTY, StaticKV
from pretrain.optim.adamw_triton import adamw_with_copy_

torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_conv() -> None:
    """Values and the gradients of x, weight and bias against the fp64 reference: sequences shorter
    than the width and off the tiles, widths 2-5, with and without bias and document ids (documents
    of one token too), rows sliced from wider rows; one longer than a backward program's walk along l."""
    g = torch.Generator().manual_seed(0)
    for b, l, d, w, bias, docs, extra in [(2, 150, 70, 4, True, True, 6), (1, 3, 5, 4, False, False, 0),
                                          (2, 65, 64, 2, True, False, 0), (1, 130, 33, 5, False, True, 3),
                                          (2, 2100, 9, 4, True, True, 0)]:
        x = torch.randn(b, l, d + extra, generator=g)[..., :d]
        weight = torch.randn(d, w, generator=g)
        bi = torch.randn(d, generator=g) if bias else None
        seq_idx = (torch.rand(b, l, generator=g) < 0.2).cumsum(1).int() if docs else None
        dy = torch.randn(b, l, d, generator=g)
        leaves = [t.double().requires_grad_() for t in (x, weight, bi) if t is not None]
        want = causal_conv1d_reference(leaves[0].transpose(1, 2), leaves[1], leaves[2] if bias else None, None,
                                       seq_idx.long() if docs else None).transpose(1, 2)
        want_grads = torch.autograd.grad(want, leaves, dy.double())
        got = conv_silu_triton(x, weight, bi, seq_idx)
        got_grads = [t for t in conv_silu_backward_triton(dy, x, weight, bi, seq_idx) if t is not None]
        case = (b, l, d, w, bias, docs)
        assert rel(got, want) < 1e-6, (case, "y", rel(got, want))
        for name, a, e in zip(("x", "weight", "bias"), got_grads, want_grads):
            assert rel(a, e) < 1e-5, (case, name, rel(a, e))


def check_gated_norm() -> None:
    """Values and the gradients of y, z and weight against the fp64 reference: one group and several,
    a group off the power-of-two blocks, z sliced from wider rows (the projection's), more rows than
    the backward's programs (each walks several, the last one past the end)."""
    g = torch.Generator().manual_seed(0)
    for rows, d, groups, extra in [(2 * 7, 64, 1, 0), (9, 96, 2, 5), (3, 48, 3, 0), (1, 16, 1, 3)]:
        y = torch.randn(rows // 2 or 1, 2 if rows > 1 else 1, d, generator=g)
        z = torch.randn(*y.shape[:-1], d + extra, generator=g)[..., extra:]
        w = torch.rand(d, generator=g) + 0.5
        dout = torch.randn(y.shape, generator=g)
        leaves = [t.double().requires_grad_() for t in (y, z, w)]
        want = gated_rms_norm_reference(*leaves, 1e-5, groups)
        want_grads = torch.autograd.grad(want, leaves, dout.double())
        got, rstd = gated_norm_triton(y, z, w, 1e-5, groups)
        got_grads = gated_norm_backward_triton(dout, y, z, w, rstd)
        case = (tuple(y.shape), groups, extra)
        assert rel(got, want) < 1e-6, (case, "out", rel(got, want))
        for name, a, e in zip(("y", "z", "weight"), got_grads, want_grads):
            assert a.shape == e.shape and rel(a, e) < 1e-5, (case, name, rel(a, e))


def check_softmax_xent() -> None:
    """Each row's loss and the gradient written over the logits (two vocabulary blocks, an ignored row;
    rows whose first block is all -inf, masked logits: the online max stays -inf over a block)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5000, generator=g) * 3
    logits[6:, :4096] = float("-inf")
    targets = torch.tensor([0, 4999, 17, -100, 4096, 4095, 4500, -100])
    scale = torch.tensor(0.25)
    want_logits, got_logits = logits.clone(), logits.clone()
    want = softmax_xent_reference(want_logits, targets, scale)
    got = softmax_xent_triton(got_logits, targets, scale)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-7)
    assert torch.equal(got_logits[3], torch.zeros(5000)) and torch.equal(got_logits[7], torch.zeros(5000))


def check_adamw() -> None:
    """Three steps (a changing learning rate, a gradient scale) against torch's AdamW: fp32 masters and
    moments within fp32 rounding, the bf16 copy the master's to one unit in the last place."""
    g = torch.Generator().manual_seed(0)
    param = torch.randn(5000, generator=g) * 0.02  # off the kernel's 2048-element blocks
    ref = torch.nn.Parameter(param.clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    copy = torch.empty_like(param, dtype=torch.bfloat16)
    for step, scale in enumerate((1.0, 0.37, 1.0), start=1):
        grad = (torch.randn(5000, generator=g) * 0.1).to(torch.bfloat16)
        opt.param_groups[0]["lr"] = 1e-3 * step
        ref.grad = grad.float() * scale
        opt.step()
        adamw_with_copy_(param, grad, exp_avg, exp_avg_sq, copy, step=step, lr=1e-3 * step, beta1=0.9, beta2=0.95,
                         eps=1e-8, weight_decay=0.1, grad_scale=scale)
    torch.testing.assert_close(param, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg, opt.state[ref]["exp_avg"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(exp_avg_sq, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(copy.float(), param, rtol=2**-7, atol=0)


def check_decode_attention() -> None:
    """One decode query (and a few) over a chunked static cache against the split-K PyTorch form in
    fp64: grouped-query heads, head dims off the power-of-two blocks (the intra-hybrid's 72 / 144 in
    small), empty slots, a chunk smaller than the kernel's dot tile and one read in several blocks,
    more chunks than the combine's block, a sliding window with sinks over positions in any slot
    order (as a ring holds them)."""
    g = torch.Generator().manual_seed(0)
    for b, h, kv, lq, dq, dv, chunks, c, length, window, sinks in [
            (2, 8, 2, 1, 16, 16, 3, 16, 40, None, 0), (1, 4, 4, 2, 9, 18, 40, 4, 150, None, 0),
            (2, 6, 2, 1, 8, 8, 5, 4, 17, 8, 2), (1, 4, 1, 3, 32, 32, 2, 64, 100, 30, 4),
            (1, 4, 2, 1, 16, 24, 3, 256, 700, None, 0)]:
        q = torch.randn(b, lq, h, dq, generator=g).transpose(1, 2)  # the attention's layout: strided heads
        k, v = torch.randn(chunks, b, kv, c, dq, generator=g), torch.randn(chunks, b, kv, c, dv, generator=g)
        k_pos = torch.full((chunks * c,), EMPTY)
        used = min(length, chunks * c)
        k_pos[:used] = torch.randperm(length, generator=g)[:used] if window else torch.arange(used)
        q_pos = torch.arange(lq) + length - lq
        want = decode_attention(q.double(), k.double(), v.double(), q_pos, k_pos, window, sinks)
        got = decode_attention_triton(q, k, v, q_pos, k_pos, window, sinks)
        assert got.shape == want.shape and rel(got, want) < 1e-6, ((b, h, kv, lq, dq, dv, window), rel(got, want))


def check_kv_write() -> None:
    """The one-launch cache write against `StaticKV._write`: a global cache (a token in a later chunk)
    and a sliding window's ring past its sinks, one token and several, keys and values of different
    widths given as strided views (the attention's [b, l, kv, d] transposed)."""
    g = torch.Generator().manual_seed(0)
    for window, sinks, positions in [(None, 0, [37]), (None, 0, [5, 6, 7]), (6, 2, [1]), (6, 2, [9, 10, 11])]:
        want = StaticKV(2, 3, 8, 12, 48, window, sinks, torch.float32, torch.device("cpu"), chunk=16)
        got = StaticKV(2, 3, 8, 12, 48, window, sinks, torch.float32, torch.device("cpu"), chunk=16)
        pos = torch.tensor(positions)
        k = torch.randn(2, len(positions), 3, 8, generator=g).transpose(1, 2)
        v = torch.randn(2, len(positions), 3, 12, generator=g).transpose(1, 2)
        want._write(k, v, pos)
        kv_write_triton(got, k, v, pos)
        for name in ("k", "v", "pos"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (window, positions, name)


def check_mamba2_step() -> None:
    """The conv and SSM step against the fp64 reference: y and both states (updated in place), one and
    several groups, head dims off the blocks, conv widths 2-4, with and without bias, dt past softplus's
    threshold and far below it, xbc and dt column slices of wider rows."""
    g = torch.Generator().manual_seed(0)
    for b, h, p, n, groups, w, bias, extra in [(2, 4, 16, 8, 1, 4, True, 5), (1, 6, 12, 16, 3, 3, False, 0),
                                               (3, 2, 40, 32, 2, 2, True, 0)]:
        conv_dim = h * p + 2 * groups * n
        rows = torch.randn(b, extra + conv_dim + h, generator=g)
        xbc, dt = rows[:, extra:extra + conv_dim], rows[:, extra + conv_dim:]
        conv_state, ssm = torch.randn(b, conv_dim, w - 1, generator=g), torch.randn(b, h, p, n, generator=g)
        weight = torch.randn(conv_dim, w, generator=g) * 0.5
        bi = torch.randn(conv_dim, generator=g) if bias else None
        dt_bias = torch.randn(h, generator=g) - 3
        dt_bias[0], dt_bias[-1] = 25.0, -9.0
        A_log, D = torch.randn(h, generator=g), torch.randn(h, generator=g)
        inputs = (xbc, dt, conv_state, weight, bi, dt_bias, A_log, D, ssm)
        want = mamba2_step_reference(*(t.double() if t is not None else None for t in inputs), p)
        got_conv, got_ssm = conv_state.clone(), ssm.clone()
        y = mamba2_step_triton(xbc, dt, got_conv, weight, bi, dt_bias, A_log, D, got_ssm, p)
        for name, a, e in zip(("y", "conv state", "ssm state"), (y, got_conv, got_ssm), want):
            assert a.shape == e.shape and rel(a, e) < 1e-6, ((b, h, p, n, groups, w), name, rel(a, e))


if __name__ == "__main__":
    {"conv": check_conv, "gated_norm": check_gated_norm, "softmax_xent": check_softmax_xent, "adamw": check_adamw,
     "decode_attention": check_decode_attention, "kv_write": check_kv_write, "mamba2_step": check_mamba2_step}[sys.argv[1]]()
    print("ok")
