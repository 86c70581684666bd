"""The zero-bubble schedules' split backward (input pass, then weight pass) with
`parallel.split_backward`'s grouping equals one full backward, on a graph where torch's own
grouping leaves two groups sharing an intermediate: w3 reaches both intermediates that w1 and w2
reached first. (The document-masked Mamba2 conv builds such a graph; the masked zbv / dualpipev
cases of test_pipeline_layouts.py run it through the schedules.)"""
from __future__ import annotations

import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from parallel.split_backward import transitive_param_groups


class ThreeWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = (torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.w1 + self.w3) + x.sin() * (self.w2 * self.w3)


def test_split_backward_equals_full_backward():
    torch.manual_seed(0)
    net, x, grad = ThreeWeights(), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    ref_x = x.clone().requires_grad_()
    net(ref_x).backward(grad)
    ref = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)

    split_x = x.clone().requires_grad_()
    out = net(split_x)
    with transitive_param_groups():
        (dx,), groups = stage_backward_input([out], [grad], [split_x], net.parameters())
    intermediates = [node for g in groups for node in g["intermediates"]]
    assert len(intermediates) == len(set(intermediates)) == 2, "an intermediate in two groups"
    stage_backward_weight(net.parameters(), groups)  # torch's grouping fails here (freed graph)
    torch.testing.assert_close(dx, ref_x.grad, rtol=1e-12, atol=0)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-12, atol=0, msg=name)
