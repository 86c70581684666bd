import pytest

from pretrain.model.pattern import (hybrid_pattern, parse_pattern, parse_ratio, place, ratio_counts, sized_counts,
                                    with_stages)


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
    assert hybrid_pattern("3:13", 8, "middle", "A", "S") == "SSASSASS"  # a half-way ratio: the larger count


@pytest.mark.parametrize("placement", ["middle", "front", "end", "cluster", "sandwich", "scatter"])
@pytest.mark.parametrize("n,k", [(22, 4), (11, 2), (6, 1), (30, 5), (8, 4), (7, 3), (7, 4), (13, 9)])
def test_computed_placements_are_valid(placement, n, k):
    pos = place(n, k, placement)
    assert len(set(pos)) == k and all(1 <= p <= n for p in pos)
    if placement == "front":
        assert pos[0] == 1
    if placement == "end":
        assert pos[-1] == n
    if placement in ("middle", "scatter") and k <= n - k:
        assert 1 not in pos  # never attention at the front


@pytest.mark.parametrize("placement", ["middle", "scatter"])
def test_middle_never_puts_special_blocks_side_by_side_when_avoidable(placement):
    for n in range(2, 41):
        for k in range(1, n + 1):
            pos = place(n, k, placement)
            adjacent = sum(b - a == 1 for a, b in zip(pos, pos[1:]))
            if k <= n - k:  # Mamba on both sides of every special block
                assert adjacent == 0 and 1 not in pos, (n, k, pos)
            elif k == n - k + 1:  # one more than Mamba: alternate from the first block
                assert pos == tuple(range(1, n + 1, 2)), (n, k, pos)
            else:  # as few neighbours as the counts force
                assert adjacent == k - 1 - (n - k), (n, k, pos)


@pytest.mark.parametrize("ratio,n,expected", [
    ("1:5", 13, (2,)), ("1:3", 14, (3, 4)), ("1:1", 7, (3, 4)), ("1:1", 14, (7,)), ("1:12", 13, (1,)),
    ("1:12", 3, (1,)), ("12:1", 3, (2,)), ("1:0", 5, (5,)), ("0:1", 5, (0,)), ("2:10", 13, (2,)), ("3:13", 8, (1, 2)),
])
def test_ratio_counts_nearest_with_one_of_each_kind(ratio, n, expected):
    assert ratio_counts(ratio, n) == expected


def test_ratio_needs_room_for_both_kinds():
    with pytest.raises(ValueError, match="ratio '1:5' needs at least 2 blocks"):
        ratio_counts("1:5", 1)


def brute_force_nearest(ratio, special, other, target, outside):
    stacks = [(abs(outside + k * special + (n - k) * other - target), n, -k)
              for n in range(2, 200) for k in ratio_counts(ratio, n)]
    _, n, minus_k = min(stacks)
    return n, -minus_k


@pytest.mark.parametrize("ratio", ["1:0", "1:1", "1:3", "1:5", "1:12", "0:1", "2:1", "3:13"])
@pytest.mark.parametrize("special,other,target,outside", [
    (60, 76, 973, 1), (12, 16, 96, 0), (99, 134, 2775, 3), (25, 33, 352, 0), (76, 60, 973, 0), (10, 10, 80, 0),
])
def test_sized_counts_is_the_nearest_stack(ratio, special, other, target, outside):
    assert sized_counts(ratio, special, other, target, outside) == brute_force_nearest(
        ratio, special, other, target, outside)


def test_sized_counts_paper_1b():
    """1B blocks (attention 60.8M, Mamba 76.1M; Llama 16 x 60.8M): the paper's depths per ratio."""
    depths = {r: sized_counts(r, 60_821_504, 76_117_344, 973_146_112, 2048)
              for r in ("1:0", "1:1", "1:3", "1:5", "1:12", "0:1")}
    assert depths == {"1:0": (16, 16), "1:1": (14, 7), "1:3": (13, 3), "1:5": (13, 2), "1:12": (13, 1),
                      "0:1": (13, 0)}


@pytest.mark.parametrize("bad", ["1-5", "a:b", "-1:3", "0:0", "1:2:3", "", "1.5:2", "5"])
def test_bad_ratio_is_one_line_naming_value_and_forms(bad):
    with pytest.raises(ValueError, match=r"ratio '.*' is invalid: use 'A:M'.*1:0, 1:1, 1:3, 1:5, 1:12, 0:1") as e:
        parse_ratio(bad)
    assert repr(bad) in str(e.value) and "\n" not in str(e.value)


def test_bad_placement_names_value_and_forms():
    with pytest.raises(ValueError, match=r"placement 'diagonal' is invalid: use one of middle, front, end .*"
                                         r"scatter, cluster, sandwich"):
        place(13, 0, "diagonal")


def test_bad_symbol_names_symbol_and_position():
    with pytest.raises(ValueError, match=r"unknown symbol 'X' at position 4"):
        parse_pattern("MMMXMM")
    with pytest.raises(ValueError, match="empty pipeline stage"):
        parse_pattern("MM||MM")


def test_stage_boundaries():
    p = parse_pattern("MMA|MMA|MM")
    assert p.blocks == tuple("MMAMMAMM") and p.stages == ((0, 3), (3, 6), (6, 8))
    assert with_stages("MMMAMMMAMMMMM", 2) == "MMMAMM|MAMMMMM"
