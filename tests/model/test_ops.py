"""Kernel references against independent oracles (float64 where exactness is the point)."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.ops import (attention, attention_reference, causal_conv1d, chunked_cross_entropy, gated_rms_norm,
                                cross_entropy_reference, grouped_mm, grouped_mm_reference, ssd_scan,
                                ssd_scan_reference)
from pretrain.model.ops.attention import attention_mask


def naive_ssd(x, dt, A, B, C, state=None):
    """The recurrence one step at a time: S_t = exp(dt A) S_{t-1} + dt x_t B_t^T, y_t = S_t C_t."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    S = torch.zeros(b, h, p, n, dtype=x.dtype) if state is None else state.clone()
    ys = []
    for t in range(l):
        Bt = B[:, t].repeat_interleave(h // g, dim=1)
        Ct = C[:, t].repeat_interleave(h // g, dim=1)
        S = S * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ct))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("seq_len", [32, 45, 7])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_chunked_equals_recurrence_float64(seq_len, groups, with_state):
    g = torch.Generator().manual_seed(seq_len * 10 + groups)
    b, h, p, n = 2, 4, 3, 5
    x = torch.randn(b, seq_len, h, p, generator=g, dtype=torch.float64)
    dt = F.softplus(torch.randn(b, seq_len, h, generator=g, dtype=torch.float64))
    A = -torch.rand(h, generator=g, dtype=torch.float64) * 2 - 0.01
    B = torch.randn(b, seq_len, groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, seq_len, groups, n, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, h, p, n, generator=g, dtype=torch.float64) if with_state else None
    y, s = ssd_scan_reference(x, dt, A, B, C, chunk_size=8, initial_state=s0)
    y_ref, s_ref = naive_ssd(x, dt, A, B, C, s0)
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-10
    assert ((s - s_ref).norm() / s_ref.norm()).item() < 1e-10


def test_ssd_split_sequence_carries_state():
    """Prefill in two pieces with the carried state equals one pass (what chunked prefill relies on)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, 2, 4, generator=g, dtype=torch.float64)
    dt = F.softplus(torch.randn(1, 40, 2, generator=g, dtype=torch.float64))
    A = -torch.rand(2, generator=g, dtype=torch.float64)
    B, C = (torch.randn(1, 40, 1, 3, generator=g, dtype=torch.float64) for _ in range(2))
    y, s = ssd_scan(x, dt, A, B, C, 16)
    y1, s1 = ssd_scan(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], 16)
    y2, s2 = ssd_scan(x[:, 23:24], dt[:, 23:24], A, B[:, 23:24], C[:, 23:24], 16, s1)  # one decode step
    y3, s3 = ssd_scan(x[:, 24:], dt[:, 24:], A, B[:, 24:], C[:, 24:], 16, s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s3, s, rtol=1e-10, atol=1e-10)


def test_reference_scan_warning_only_for_cuda_scans_without_mamba_ssm(monkeypatch):
    from pretrain.model.ops import ssd

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(ssd, "has_mamba_ssd", lambda: False)
    for blocks in ("MMA", "AH"):
        assert "pip install -e '.[gpu]'" in ssd.reference_scan_warning(cuda, blocks)
    assert ssd.reference_scan_warning(cuda, "AS") is None  # no scan to fall back
    assert ssd.reference_scan_warning(cpu, "MMA") is None  # the reference is the CPU path
    monkeypatch.setattr(ssd, "has_mamba_ssd", lambda: True)
    assert ssd.reference_scan_warning(cuda, "MMA") is None


def test_causal_conv_matches_manual_and_state():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    y = causal_conv1d(x, w, bias)
    xp = F.pad(x, (3, 0))
    manual = torch.stack([(xp[..., t:t + 4] * w).sum(-1) for t in range(10)], -1) + bias[:, None]
    torch.testing.assert_close(y, F.silu(manual))
    y_tail = causal_conv1d(x[..., 7:], w, bias, state=x[..., 4:7])
    torch.testing.assert_close(y_tail, y[..., 7:])
    empty = causal_conv1d(x[..., :0], w, bias)  # no position: an empty output, as the kernels return
    assert empty.shape == (2, 6, 0) and empty.dtype == x.dtype


def test_conv_taps_equal_the_depthwise_conv_values_and_grads():
    """What compiled blocks run instead of F.conv1d and SiLU (no document ids): fp64, against them."""
    from pretrain.model.ops.conv import _conv_taps

    g = torch.Generator().manual_seed(3)
    padded = torch.randn(2, 6, 13, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    got = _conv_taps(padded[..., 3:], padded[..., :3], w, bias, None)
    want = F.silu(F.conv1d(padded, w[:, None, :], bias, groups=6))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (padded, w, bias), upstream),
                    torch.autograd.grad(want, (padded, w, bias), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_conv_taps_follow_autocast_like_the_eager_conv(masked):
    """Under autocast an fp32 input convolves in bf16 whether the conv is eager (F.conv1d, or the
    masked conv) or compiled (the taps): same dtype out, values within bf16 rounding."""
    from pretrain.model.ops.conv import _conv_taps, causal_conv1d_reference

    g = torch.Generator().manual_seed(5)
    x, w, bias = torch.randn(2, 6, 12, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if masked else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = causal_conv1d_reference(x, w, bias, None, seq_idx)
        taps = _conv_taps(x, None, w, bias, seq_idx)
    assert eager.dtype == taps.dtype == torch.bfloat16
    torch.testing.assert_close(taps.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_attention_mask_sliding_window_with_sinks():
    pos = torch.arange(10)
    m = attention_mask(pos, pos, window=3, n_sink=2)
    assert m[9].tolist() == [True, True, False, False, False, False, False, True, True, True]
    assert m[2].tolist() == [True, True, True] + [False] * 7
    assert not m.triu(1).any()


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_path_matches_reference(window):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 12, 8, generator=g)
    k = torch.randn(2, 2, 12, 8, generator=g)
    v = torch.randn(2, 2, 12, 6, generator=g)
    pos = torch.arange(12)
    out = attention(q, k, v, pos, pos, window, 2)
    torch.testing.assert_close(out, attention_reference(q, k, v, pos, pos, window, 2), rtol=1e-5, atol=1e-5)
    # decoding the last position against the cache gives the last row
    last = attention(q[:, :, -1:], k, v, pos[-1:], pos, window, 2)
    torch.testing.assert_close(last, out[:, :, -1:], rtol=1e-5, atol=1e-5)


def test_grouped_mm_matches_per_expert_matmul():
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), 6, generator=g)
    w = torch.randn(4, 6, 7, generator=g)
    out = grouped_mm(x, w, counts.cumsum(0))
    expected = torch.cat([x[:3] @ w[0], x[3:8] @ w[2], x[8:] @ w[3]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grouped_mm_reference(x, w, counts.cumsum(0)), expected)


@pytest.mark.parametrize("chunk_rows", [16, None])
def test_chunked_cross_entropy_value_and_grads(chunk_rows, monkeypatch):
    from pretrain.model.ops import cross_entropy as ce

    monkeypatch.setattr(ce, "CHUNK_LOGITS", 97 * 20)  # the default then splits 150 rows into 8 chunks
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 50, 16, generator=g, requires_grad=True)
    w = torch.randn(97, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 97, (3, 50), generator=g)
    t[0, :5] = -100
    ref = cross_entropy_reference(h, w, t)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    out = chunked_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh, gh_ref)
    torch.testing.assert_close(gw, gw_ref)


@pytest.mark.parametrize("rows,budget,expected", [(16384, 4185, 4096), (150, 20, 19), (7, 100, 7), (5000, 4185, 2560),
                                                  (10241, 1025, 1025), (1025, 1025, 1025), (0, 4185, 1)])
def test_even_chunk_rows_splits_evenly_within_the_budget(rows, budget, expected):
    from pretrain.model.ops.cross_entropy import even_chunk_rows

    per_chunk = even_chunk_rows(rows, budget)
    assert per_chunk == expected
    assert per_chunk <= max(budget, 1)
    assert -(-rows // per_chunk) <= -(-rows // budget)  # no more chunks than the budget needs


def test_chunked_cross_entropy_of_no_rows_is_zero():
    h = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    out = chunked_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0 and w.grad.abs().sum().item() == 0 and h.grad.shape == (0, 16)


def test_softmax_xent_reference_is_the_scaled_cross_entropy_gradient():
    """The per-chunk step of the chunked loss (the Triton kernel's oracle on the GPU): row losses and,
    written over the logits, d(scale * sum CE) / d logits, ignored rows zero; fp64 against autograd."""
    from pretrain.model.ops.softmax_xent_triton import softmax_xent_reference

    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, -1, 39, 0, 17, -1])
    expected = F.cross_entropy(x, t, ignore_index=-1, reduction="none")
    (grad,) = torch.autograd.grad(expected.sum() * 0.25, x)
    logits = x.detach().clone()
    loss = softmax_xent_reference(logits, t, torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, grad, rtol=1e-12, atol=1e-12)
    untouched = x.detach().clone()
    softmax_xent_reference(untouched, t, torch.tensor(0.25, dtype=torch.float64), grad=False)
    assert torch.equal(untouched, x.detach())


@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_chunked_cross_entropy_fp64_to_1e12(ignore_index):
    """fp64 throughout (the parallel-layout tests compare layouts at 1e-10): 143 counted rows, whose
    reciprocal fp32 cannot hold; a non-negative ignore_index must be ignored, not taken as a class."""
    g = torch.Generator().manual_seed(9)
    h = torch.randn(150, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(1, 97, (150,), generator=g)
    t[:7] = ignore_index
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=ignore_index)  # fp64 (the reference helper is fp32)
    out = chunked_cross_entropy(h, w, t, chunk_rows=40, ignore_index=ignore_index)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_cross_entropy_on_meta_tensors():
    """Shape inference (meta tensors, where autocast does not exist) runs the loss too."""
    h = torch.empty(12, 8, device="meta", requires_grad=True)
    w = torch.empty(20, 8, device="meta", requires_grad=True)
    out = chunked_cross_entropy(h, w, torch.zeros(12, dtype=torch.long, device="meta"), chunk_rows=5)
    assert out.device.type == "meta" and out.shape == ()


def test_chunked_cross_entropy_under_bf16_autocast():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(300, 64, generator=g, requires_grad=True)
    w = (torch.randn(500, 64, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (300,), generator=g)
    t[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_cross_entropy(h, w, t, chunk_rows=64)
        ref = cross_entropy_reference(h, w, t)
    for a, b in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
    assert abs(out.item() - ref.item()) < 1e-2 * ref.item()


def test_gated_rms_norm_is_group_local():
    g = torch.Generator().manual_seed(5)
    y, z = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    w = torch.rand(8, generator=g)
    out = gated_rms_norm(y, z, w, 1e-6, n_groups=2)
    x = y * F.silu(z)
    for half in (slice(0, 4), slice(4, 8)):
        xs = x[:, half]
        torch.testing.assert_close(out[:, half], xs / xs.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w[half])


def test_chunked_cross_entropy_skips_gradient_work_without_grad(monkeypatch):
    from pretrain.model.ops import cross_entropy as ce

    seen = []
    real_apply = ce._ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(ce._ChunkedLinearCrossEntropy, "apply", lambda *a: seen.append(a[5]) or real_apply(*a))  # a[5]: needs_grad
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.randint(0, 20, (10,))
    with torch.no_grad():
        value = chunked_cross_entropy(h, w, t, chunk_rows=4)
    assert seen == [False]
    torch.testing.assert_close(value, cross_entropy_reference(h, w, t))
    chunked_cross_entropy(h, w, t, chunk_rows=4)
    assert seen == [False, True]


def test_causal_suffix_attention_matches_the_position_masked_reference():
    """A context-parallel query chunk: the last 5 of 12 positions over all 12 keys (GQA 4:2)."""
    from pretrain.model.ops import causal_suffix_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    want = attention_reference(q, k, v, torch.arange(7, 12), torch.arange(12))
    torch.testing.assert_close(causal_suffix_attention(q, k, v), want)
