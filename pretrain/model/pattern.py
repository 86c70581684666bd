"""Layer patterns: a model's stack as a short string, one symbol per block.

    A  global attention          S  sliding-window attention (with sinks)
    M  Mamba2                    H  intra-layer hybrid (attention || Mamba2)
    |  pipeline-stage boundary (not a block)

e.g. the paper's 1B inter-hybrid 1:5 is `MMMAMMMAMMMMM`. Placements are 1-indexed block positions,
as in the paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_SYMBOLS = {"A": "attention", "S": "sliding-window attention", "M": "mamba2", "H": "intra-hybrid"}
STAGE_BOUNDARY = "|"

INTER_PLACEMENTS = ("front", "middle", "end")
INTRA_PLACEMENTS = ("scatter", "cluster", "sandwich")

# The paper's published layouts (1-indexed positions of the non-Mamba blocks), keyed by
# (n_blocks, n_special, placement). They are data from the paper, used where the paper gives one;
# every other case is computed by `place`.
PAPER_LAYOUTS: dict[tuple[int, int, str], tuple[int, ...]] = {
    (13, 2, "middle"): (4, 8),      # 1B inter 1:5 (T17)
    (13, 2, "front"): (1, 8),
    (13, 2, "end"): (4, 11),
    (13, 3, "middle"): (3, 7, 11),  # 1B inter 1:3
    (14, 7, "middle"): (2, 4, 6, 8, 10, 12, 14),  # 1B inter 1:1
    (13, 1, "middle"): (7,),        # 1B inter 1:12
    (13, 1, "front"): (1,),
    (13, 2, "scatter"): (5, 9),     # 1B intra 1:5 (T21)
    (13, 2, "cluster"): (9, 10),
    (13, 2, "sandwich"): (1, 13),
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
        a, m = (int(v) for v in ratio.split(":"))
    except ValueError:
        raise ValueError(f"ratio '{ratio}' is not 'A:M' with integers, e.g. '1:5'") from None
    if a < 0 or m < 0 or a + m == 0:
        raise ValueError(f"ratio '{ratio}' needs non-negative parts, not both zero")
    return a, m


def count_special(ratio: str, n_blocks: int) -> int:
    a, m = parse_ratio(ratio)
    return max(1, int(n_blocks * a / (a + m) + 0.5)) if a else 0


def place(n_blocks: int, n_special: int, placement: str) -> tuple[int, ...]:
    """1-indexed positions of `n_special` blocks among `n_blocks`.

    middle/scatter: evenly spread, Mamba runs at both ends; front/end: the same spacing shifted
    to start at the first / finish at the last block; cluster: adjacent, centred; sandwich: split
    between the first and the last blocks.
    """
    if not 0 <= n_special <= n_blocks:
        raise ValueError(f"cannot place {n_special} blocks among {n_blocks}")
    if (n_blocks, n_special, placement) in PAPER_LAYOUTS:
        return PAPER_LAYOUTS[(n_blocks, n_special, placement)]
    if n_special == 0:
        return ()
    if n_special == n_blocks:
        return tuple(range(1, n_blocks + 1))
    k, n = n_special, n_blocks
    spread = [int((i + 1) * (n + 1) / (k + 1) + 0.5) for i in range(k)]
    if placement in ("middle", "scatter"):
        return tuple(spread)
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
    raise ValueError(f"unknown placement '{placement}': use one of {INTER_PLACEMENTS + INTRA_PLACEMENTS}")


def hybrid_pattern(ratio: str, n_blocks: int, placement: str = "middle", special: str = "A") -> str:
    """Pattern for a ratio of `special` blocks ('A', 'S' or 'H') to Mamba blocks."""
    positions = set(place(n_blocks, count_special(ratio, n_blocks), placement))
    return "".join(special if i in positions else "M" for i in range(1, n_blocks + 1))


def with_stages(pattern: str, n_stages: int) -> str:
    """Insert pipeline boundaries so that stages get blocks as evenly as possible."""
    blocks = parse_pattern(pattern).blocks
    if not 1 <= n_stages <= len(blocks):
        raise ValueError(f"cannot split {len(blocks)} blocks into {n_stages} pipeline stages")
    bounds = [round(i * len(blocks) / n_stages) for i in range(n_stages + 1)]
    return STAGE_BOUNDARY.join("".join(blocks[a:b]) for a, b in zip(bounds, bounds[1:]))
