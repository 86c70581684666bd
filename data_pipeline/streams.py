"""Canonical streams: the unit of data order, independent of how many ranks/workers there are.

Window number c of the run (counted over global batches: c = step * global_batch + row) is read
from stream `c % num_streams`. Stream s is owned by data-parallel rank `s % dp_size`, so with
`dp_size | num_streams` and `dp_size | global_batch` every rank can produce exactly its rows
of each global batch from its own streams, and the global batches do not depend on dp_size.
"""
from __future__ import annotations

from data_pipeline.errors import DataInputError


def check_rank(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataInputError("loader", "dp_rank/dp_size", f"rank {dp_rank} of {dp_size}", "need 0 <= dp_rank < dp_size")


def check_layout(num_streams: int, dp_rank: int, dp_size: int) -> None:
    check_rank(dp_rank, dp_size)
    if num_streams % dp_size:
        raise DataInputError("loader", "num_streams", f"{num_streams} is not divisible by dp_size {dp_size}",
                             "choose num_streams as a multiple of every dp_size you will run with (e.g. 64)")


def rank_streams(dp_rank: int, dp_size: int, num_streams: int) -> list[int]:
    """The canonical streams a rank reads (and whose state it checkpoints)."""
    return list(range(dp_rank, num_streams, dp_size))


def global_row_indices(dp_rank: int, dp_size: int, batch_size: int, windows_before: int = 0) -> list[int]:
    """Rows of each global batch (dp_size * batch_size rows) that this rank's local rows are, in order.

    Local row i of every batch is global row `global_row_indices(...)[i]`. `windows_before` is
    the loader's `state_dict()["global_windows"]` at the point it was (re)started: a resume on a
    different dp_size may start mid-cycle, which rotates which rows a rank owns.
    """
    return [j for j in range(dp_size * batch_size) if (windows_before + j) % dp_size == dp_rank]


def worker_streams(streams: list[int], worker_id: int, num_workers: int) -> list[int]:
    """Streams of a rank dealt round-robin to its loader workers."""
    return streams[worker_id::num_workers]
