"""A correct parameter grouping for the zero-bubble schedules' split backward.

ZBV and DualPipeV split a stage's backward into an input pass (`stage_backward_input`) and a
later weight pass (`stage_backward_weight`, one `autograd.grad` per parameter group, freeing the
graph as it goes). The groups come from `torch.distributed.pipelining._backward.get_param_groups`,
which merges a parameter into the group of an intermediate it shares but leaves the intermediates
it reached first in their own, unmerged group (torch 2.13, and the same code since the split
backward appeared; no upstream issue found, pytorch#180952 is a neighbouring bug of this pass). Two groups then share an
intermediate: the second group's pass runs through buffers the first one freed ("Trying to
backward through the graph a second time"), and with the graph retained its gradient would be
counted twice. A parameter reaching an intermediate by two paths is enough, e.g. a conv bias
added both by the conv and by the outputs the document-masked conv recomputes after each
document start. `transitive_param_groups` swaps in a grouping that merges every group a
parameter touches (connected components), for the duration of a schedule's step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.autograd.graph import Node
from torch.distributed.pipelining import _backward


def param_groups(inputs: list[Node], params: list[Node], reverse_edges: dict) -> list[dict[str, Any]]:
    """`get_param_groups`'s contract (groups of parameters and the input-dependent intermediates
    their gradients flow through) with groups merged transitively: no intermediate in two groups.
    A parameter that reaches no intermediate joins no group, as in torch."""
    inputs_closure, _ = _backward.reverse_closure(inputs, set(), reverse_edges)
    groups: list[dict[str, set]] = []
    owner: dict[Node, dict[str, set]] = {}
    for param in params:
        _, reached = _backward.reverse_closure([param], inputs_closure, reverse_edges)
        if not reached:
            continue
        group: dict[str, set] = {"params": {param}, "intermediates": set(reached)}
        for other in {id(owner[n]): owner[n] for n in reached if n in owner}.values():
            group["params"] |= other["params"]
            group["intermediates"] |= other["intermediates"]
            groups = [g for g in groups if g is not other]
        for node in group["intermediates"]:
            owner[node] = group
        groups.append(group)
    return groups


@contextlib.contextmanager
def transitive_param_groups() -> Iterator[None]:
    """Within the block, torch's split backward groups parameters with `param_groups`."""
    original = _backward.get_param_groups
    _backward.get_param_groups = param_groups
    try:
        yield
    finally:
        _backward.get_param_groups = original
