"""Layer patterns: a model's stack as a short string, one symbol per block.

    A  global attention          S  sliding-window attention (with sinks)
    M  Mamba2                    H  intra-layer hybrid (attention || Mamba2)
    |  pipeline-stage boundary (not a block)

e.g. the paper's 1B inter-hybrid 1:5 is `MMMAMMMAMMMMM`. Placements are 1-indexed block positions,
as in the paper's tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_SYMBOLS = {"A": "attention", "S": "sliding-window attention", "M": "mamba2", "H": "intra-hybrid"}
STAGE_BOUNDARY = "|"

INTER_PLACEMENTS = ("middle", "front", "end")
INTRA_PLACEMENTS = ("scatter", "cluster", "sandwich")
PAPER_RATIOS = ("1:0", "1:1", "1:3", "1:5", "1:12", "0:1")  # attention:Mamba sweep (T3, T17)

# The paper's published layouts (1-indexed positions of the non-Mamba blocks) that `place` would
# not compute, keyed by (n_blocks, n_special, placement): data from the paper, used where it gives
# one. Its other layouts (1B 1:1 {2, 4, ..., 14}, 1:12 {7}, intra scatter {5, 9}, sandwich
# {1, 13}) are what `place` computes.
PAPER_LAYOUTS: dict[tuple[int, int, str], tuple[int, ...]] = {
    (13, 2, "middle"): (4, 8),      # 1B inter 1:5 (T17)
    (13, 2, "front"): (1, 8),
    (13, 2, "end"): (4, 11),
    (13, 3, "middle"): (3, 7, 11),  # 1B inter 1:3
    (13, 2, "cluster"): (9, 10),    # 1B intra 1:5 (T21)
}


@dataclass(frozen=True)
class Pattern:
    blocks: tuple[str, ...]
    stages: tuple[tuple[int, int], ...]  # [start, end) block indices of each pipeline stage

    def __str__(self) -> str:
        return "".join(self.blocks)


def parse_pattern(pattern: str) -> Pattern:
    """Validate a pattern string; errors name the bad symbol and its (1-indexed) position."""
    if not pattern or not pattern.replace(STAGE_BOUNDARY, ""):
        raise ValueError("layer pattern is empty: give one symbol per block, e.g. 'MMMAMMMAMMMMM'")
    blocks: list[str] = []
    stages: list[tuple[int, int]] = []
    start = 0
    for pos, sym in enumerate(pattern, 1):
        if sym == STAGE_BOUNDARY:
            if len(blocks) == start:
                raise ValueError(f"layer pattern '{pattern}': empty pipeline stage at position {pos}")
            stages.append((start, len(blocks)))
            start = len(blocks)
        elif sym in BLOCK_SYMBOLS:
            blocks.append(sym)
        else:
            allowed = ", ".join(f"{k}={v}" for k, v in BLOCK_SYMBOLS.items())
            raise ValueError(
                f"layer pattern '{pattern}': unknown symbol '{sym}' at position {pos} "
                f"(allowed: {allowed}, '{STAGE_BOUNDARY}'=pipeline boundary)")
    if len(blocks) == start:
        raise ValueError(f"layer pattern '{pattern}': empty pipeline stage at the end")
    stages.append((start, len(blocks)))
    return Pattern(tuple(blocks), tuple(stages))


def parse_ratio(ratio: str) -> tuple[int, int]:
    """'1:5' -> (1, 5): special (attention / intra) blocks to Mamba blocks."""
    try:
        a, m = (int(v) for v in str(ratio).split(":"))
    except ValueError:
        a = m = -1
    if a < 0 or m < 0 or a + m == 0:
        raise ValueError(f"ratio {ratio!r} is invalid: use 'A:M', two non-negative integers not both 0 "
                         f"(the paper's: {', '.join(PAPER_RATIOS)})")
    return a, m


def canonical_ratio(ratio: str) -> str:
    """The ratio in lowest terms ('2:10', ' 1:5' -> '1:5'): equal ratios name one model."""
    a, m = parse_ratio(ratio)
    g = math.gcd(a, m)
    return f"{a // g}:{m // g}"


def ratio_counts(ratio: str, n_blocks: int) -> tuple[int, ...]:
    """The special-block counts among `n_blocks` nearest the ratio: one, or two when it falls
    half-way; at least one block of each kind the ratio names."""
    a, m = parse_ratio(ratio)
    if a and m and n_blocks < 2:
        raise ValueError(f"ratio '{ratio}' needs at least 2 blocks, not {n_blocks}")
    if not (a and m):
        return (n_blocks if a else 0,)
    low, rest = divmod(n_blocks * a, a + m)  # n_blocks * a / (a + m) = low + rest / (a + m)
    nearest = [low] if 2 * rest < a + m else [low + 1] if 2 * rest > a + m else [low, low + 1]
    return tuple(sorted({min(n_blocks - 1, max(1, k)) for k in nearest}))


def count_special(ratio: str, n_blocks: int) -> int:
    """Special blocks among a fixed `n_blocks` (a half-way ratio takes the larger count)."""
    return ratio_counts(ratio, n_blocks)[-1]


def sized_counts(ratio: str, special_params: int, other_params: int, target: int,
                 outside: int = 0) -> tuple[int, int]:
    """(blocks, special blocks) of the stack whose parameter count is nearest `target`, special
    blocks as near the ratio as whole blocks allow (`ratio_counts`). Blocks differ in size (an
    attention block is smaller than a Mamba one), so a ratio's depth follows from its mix: how the
    paper kept every ratio at its model size (1B: 1:1 has 14 blocks, 1:5 13, attention-only 16).
    Ties go to the shallower stack, then to more special blocks."""
    if min(special_params, other_params) <= 0:
        raise ValueError("block parameter counts must be positive")
    a, m = parse_ratio(ratio)
    stacks: list[tuple[int, int, int]] = []  # (distance, n, -k): sorts in the order of preference
    n = 2 if a and m else 1
    while True:
        sizes = {k: outside + k * special_params + (n - k) * other_params for k in ratio_counts(ratio, n)}
        # the smallest stack grows by at least one block per step: no deeper one can be nearer
        if stacks and min(sizes.values()) - target > min(stacks)[0]:
            _, n_best, minus_k = min(stacks)
            return n_best, -minus_k
        stacks += [(abs(size - target), n, -k) for k, size in sizes.items()]
        n += 1


def _spread(n: int, k: int) -> list[int]:
    """k of n blocks spread evenly: the n-k others split as evenly as possible before, between and
    after them (a half rounds up), so two are never adjacent and none is first while k <= n-k.
    With more, the others are spread instead (k = n-k+1 alternates from the first block)."""
    others = n - k
    if k > others:
        taken = set(_spread(n, others))
        return [p for p in range(1, n + 1) if p not in taken]
    return [i + max(i, int(i * others / (k + 1) + 0.5)) for i in range(1, k + 1)]


def place(n_blocks: int, n_special: int, placement: str) -> tuple[int, ...]:
    """1-indexed positions of `n_special` blocks among `n_blocks`.

    middle/scatter: evenly spread, Mamba runs at both ends; front/end: the same spacing shifted
    to start at the first / finish at the last block; cluster: adjacent, centred; sandwich: split
    between the first and the last blocks.
    """
    if placement not in INTER_PLACEMENTS + INTRA_PLACEMENTS:
        raise ValueError(f"placement {placement!r} is invalid: use one of {', '.join(INTER_PLACEMENTS)} "
                         f"(inter-layer) or {', '.join(INTRA_PLACEMENTS)} (intra-layer)")
    if not 0 <= n_special <= n_blocks:
        raise ValueError(f"cannot place {n_special} blocks among {n_blocks}")
    if (n_blocks, n_special, placement) in PAPER_LAYOUTS:
        return PAPER_LAYOUTS[(n_blocks, n_special, placement)]
    n, k = n_blocks, n_special
    if k == 0:
        return ()
    spread = _spread(n, k)
    if placement == "front":
        return tuple(p - spread[0] + 1 for p in spread)
    if placement == "end":
        return tuple(p + n - spread[-1] for p in spread)
    if placement == "cluster":
        first = (n - k) // 2 + 1
        return tuple(range(first, first + k))
    if placement == "sandwich":
        head = (k + 1) // 2
        return (*range(1, head + 1), *range(n - (k - head) + 1, n + 1))
    return tuple(spread)  # middle, scatter


def layout(n_blocks: int, n_special: int, placement: str, special: str = "A", other: str = "M") -> str:
    """Pattern of `n_special` `special` blocks ('A' or 'H') placed among `n_blocks`, the rest
    `other` ('M', or 'S' for the sliding-window baseline's global:local layers)."""
    positions = set(place(n_blocks, n_special, placement))
    return "".join(special if i in positions else other for i in range(1, n_blocks + 1))


def hybrid_pattern(ratio: str, n_blocks: int, placement: str = "middle", special: str = "A",
                   other: str = "M") -> str:
    """Pattern for a ratio of `special` to `other` blocks at a fixed depth."""
    return layout(n_blocks, count_special(ratio, n_blocks), placement, special, other)


def with_stages(pattern: str, n_stages: int) -> str:
    """Insert pipeline boundaries so that stages get blocks as evenly as possible."""
    blocks = parse_pattern(pattern).blocks
    if not 1 <= n_stages <= len(blocks):
        raise ValueError(f"cannot split {len(blocks)} blocks into {n_stages} pipeline stages")
    bounds = [round(i * len(blocks) / n_stages) for i in range(n_stages + 1)]
    return STAGE_BOUNDARY.join("".join(blocks[a:b]) for a, b in zip(bounds, bounds[1:]))


def balance_stages(costs: Sequence[float], n_stages: int) -> tuple[tuple[int, int], ...]:
    """[start, end) block ranges of `n_stages` contiguous stages minimising the costliest stage
    (then, among equal maxima, the earliest split): hybrid blocks differ a lot in cost (attention
    vs Mamba2 vs MoE), so equal block counts are not balanced. Exact (dynamic programming)."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {n_stages} pipeline stages; lower parallel.pp "
                         "(x virtual stages per rank) to at most the number of blocks")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: the smallest max-stage cost of the first j blocks in k stages; cut[k][j]: its last start
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j] - 1e-9 * abs(best[k][j] if best[k][j] < inf else 0):
                    best[k][j], cut[k][j] = cost, i
    bounds, j = [n], n
    for k in range(n_stages, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    return tuple(zip(bounds, bounds[1:]))


def pipeline_stages(pattern: str, n_stages: int, costs: Sequence[float]) -> tuple[tuple[int, int], ...]:
    """The pipeline's stages: the pattern's `|` marks when it has any (they must make exactly
    `n_stages` stages), else `balance_stages` over the blocks' `costs`."""
    parsed = parse_pattern(pattern)
    if STAGE_BOUNDARY not in pattern:
        return balance_stages(costs, n_stages)
    if len(parsed.stages) != n_stages:
        raise ValueError(f"layer pattern '{pattern}' marks {len(parsed.stages)} pipeline stages but the layout needs "
                         f"{n_stages} (parallel.pp x virtual stages per rank); move the '{STAGE_BOUNDARY}' marks, "
                         "or drop them to balance the stages by FLOPs")
    return parsed.stages
