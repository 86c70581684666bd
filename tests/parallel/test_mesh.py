import pytest

from parallel.mesh import ParallelDims


def test_dp_shard_fills_the_world():
    dims = ParallelDims().resolve(8)
    assert dims.dp_shard == 8 and dims.dp == 8
    hsdp = ParallelDims(dp_replicate=2).resolve(8)
    assert hsdp.dp_shard == 4 and hsdp.dp == 8 and hsdp.sizes() == (1, 2, 4, 1, 1)


@pytest.mark.parametrize("dims, world, needle", [
    (ParallelDims(tp=3), 8, "does not divide"),
    (ParallelDims(dp_shard=3), 8, "world size"),
    (ParallelDims(ep=3), 8, "parallel.ep"),
])
def test_inconsistent_sizes_are_refused(dims, world, needle):
    with pytest.raises(ValueError, match=needle):
        dims.resolve(world)
