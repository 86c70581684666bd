"""Sliding window + sinks on FlexAttention (the CUDA training path of SWA): its mask equals
attention_mask's rule - checked through flex_attention's eager reference on CPU against the
explicit-softmax reference (values: flex has no CPU backward; gradients are tests/gpu) - and it
traces without a graph break."""

import torch
import torch._dynamo

from pretrain.model.ops import attention_reference
from pretrain.model.ops.flex_attention import sliding_window_attention


def test_flex_window_with_sinks_equals_reference():
    g = torch.Generator().manual_seed(0)
    l = 300  # not a multiple of the 128 block: partial blocks at the end
    q, k, v = (torch.randn(1, h, l, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    pos = torch.arange(l)
    for window, n_sink in ((100, 4), (128, 0), (1000, 2)):
        out = sliding_window_attention(q, k, v, window, n_sink, compiled=False)
        ref = attention_reference(q, k, v, pos, pos, window, n_sink)
        torch.testing.assert_close(out, ref)


def test_flex_window_traces_as_one_graph():
    q = torch.randn(1, 4, 256, 16)
    k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    torch._dynamo.reset()
    report = torch._dynamo.explain(lambda a, b, c: sliding_window_attention(a, b, c, 64, 4))(q, k, v)
    assert report.graph_break_count == 0 and report.graph_count == 1
