"""State the layers share survives FSDP2's mixed-precision input cast (`_apply_to_tensors`, run on
every wrapped block's arguments): the batch's kernel cache and a layer's generation cache are the
caller's objects inside the block, not copies that drop the block's writes."""
import torch
from torch.distributed.utils import _apply_to_tensors

from pretrain.model.lm import LayerState
from pretrain.model.packed import PackedDocs


def fsdp_input_cast(args):
    return _apply_to_tensors(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, args)


def test_fsdp_input_cast_keeps_the_batch_kernel_cache_and_layer_state():
    starts = torch.zeros(2, 16, dtype=torch.bool)
    starts[:, [0, 5]] = True
    docs, state = PackedDocs.from_starts(starts), LayerState()
    cast_docs, cast_state = fsdp_input_cast((docs, state))
    assert cast_docs is not docs and torch.equal(cast_docs.doc, docs.doc)  # the dataclass is rebuilt...
    cast_docs.kernel_cache["conv_taps"] = "built by layer 0"
    cast_state["k"] = torch.ones(1)
    assert docs.kernel_cache["conv_taps"] == "built by layer 0"  # ...its cache is not
    assert cast_state is state and "k" in state
