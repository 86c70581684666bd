import pytest

from pretrain.model.pattern import hybrid_pattern, parse_pattern, place, with_stages
from pretrain.model.presets import default_pattern


def positions(pattern, sym):
    return [i for i, s in enumerate(pattern, 1) if s == sym]


@pytest.mark.parametrize("ratio,n,expected", [
    ("1:5", 13, [4, 8]), ("1:3", 13, [3, 7, 11]), ("1:1", 14, [2, 4, 6, 8, 10, 12, 14]), ("1:12", 13, [7]),
    ("1:0", 13, list(range(1, 14))), ("0:1", 13, []),
])
def test_paper_1b_inter_layouts(ratio, n, expected):
    assert positions(hybrid_pattern(ratio, n, "middle"), "A") == expected


def test_paper_placements():
    assert positions(hybrid_pattern("1:5", 13, "front"), "A") == [1, 8]
    assert positions(hybrid_pattern("1:5", 13, "end"), "A") == [4, 11]
    assert positions(hybrid_pattern("1:5", 13, "scatter", "H"), "H") == [5, 9]
    assert positions(hybrid_pattern("1:5", 13, "cluster", "H"), "H") == [9, 10]
    assert positions(hybrid_pattern("1:5", 13, "sandwich", "H"), "H") == [1, 13]
    assert default_pattern("inter_hybrid", "1b") == "MMMAMMMAMMMMM"
    assert default_pattern("hybrid_moe", "1b") == "MMMMHMMMHMMMM"


@pytest.mark.parametrize("placement", ["middle", "front", "end", "cluster", "sandwich", "scatter"])
@pytest.mark.parametrize("n,k", [(22, 4), (11, 2), (6, 1), (30, 5)])
def test_computed_placements_are_valid(placement, n, k):
    pos = place(n, k, placement)
    assert len(set(pos)) == k and all(1 <= p <= n for p in pos)
    if placement == "front":
        assert pos[0] == 1
    if placement == "end":
        assert pos[-1] == n
    if placement in ("middle", "scatter"):
        assert 1 not in pos  # never attention at the front


def test_bad_symbol_names_symbol_and_position():
    with pytest.raises(ValueError, match=r"unknown symbol 'X' at position 4"):
        parse_pattern("MMMXMM")
    with pytest.raises(ValueError, match="empty pipeline stage"):
        parse_pattern("MM||MM")


def test_stage_boundaries():
    p = parse_pattern("MMA|MMA|MM")
    assert p.blocks == tuple("MMAMMAMM") and p.stages == ((0, 3), (3, 6), (6, 8))
    assert with_stages("MMMAMMMAMMMMM", 2) == "MMMAMM|MAMMMMM"
