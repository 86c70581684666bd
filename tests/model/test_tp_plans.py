"""Each layer's tensor-parallel declaration (shard_for_tp): the placements name real parameters,
per-head tensors split by head, and a size that cannot split is refused in one line naming the
field (the layouts themselves are checked against one process in tests/parallel)."""
import pytest
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from pretrain.model import build_model


def mixer(arch: str, symbol: str, **overrides):
    model = build_model(arch, "tiny", device="meta", **overrides)
    return next(b.mixer for b in model.blocks.values() if b.symbol == symbol)


def test_mamba2_bc_replicated_for_one_group_sharded_for_two():
    one = mixer("mamba2", "M").shard_for_tp(2, dist.group.WORLD)
    assert one["B_proj.weight"] == Replicate() and one["conv_C.bias"] == Replicate()
    assert one["z_proj.weight"] == Shard(0) and one["out_proj.weight"] == Shard(1) and one["A_log"] == Shard(0)
    m = mixer("mamba2", "M", n_groups=2)
    two = m.shard_for_tp(2, dist.group.WORLD)
    assert two["B_proj.weight"] == Shard(0) and m.bc_tp_group is None and m.norm.tp_group is None


@pytest.mark.parametrize("arch,symbol,overrides,field", [
    ("llama", "A", {"n_kv_heads": 1, "n_heads": 4}, "model.overrides.n_kv_heads=1"),
    ("mamba2", "M", {"n_groups": 2}, "n_groups=2"),
    ("intra_hybrid", "H", {}, "model.overrides.intra.kv_heads=1"),
    ("intra_hybrid", "H", {"intra": {"kv_heads": 2, "fusion": "concat", "out_proj": "unified"}}, "intra.fusion"),
])
def test_unsplittable_sizes_are_refused_in_one_line(arch, symbol, overrides, field):
    tp = 4 if field == "n_groups=2" else 2
    with pytest.raises(ValueError, match=field) as e:
        mixer(arch, symbol, **overrides).shard_for_tp(tp, dist.group.WORLD)
    assert "\n" not in str(e.value) and "parallel.tp" in str(e.value)


def test_an_ffn_width_tp_cannot_split_names_the_key():
    model = build_model("llama", "tiny", device="meta", d_ffn=201)
    with pytest.raises(ValueError, match=r"parallel.tp=2 must divide the FFN width 201 \(model.overrides.d_ffn"):
        next(iter(model.blocks.values())).ffn.shard_for_tp(2, dist.group.WORLD)
