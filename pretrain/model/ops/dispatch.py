"""One switch for every op: fast kernels on CUDA tensors unless the references are forced
(the GPU tests run the same model both ways and compare)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

_force_reference = False


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the pure-PyTorch references even on CUDA inside this block."""
    global _force_reference
    previous, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = previous


def wants_fast_kernel(t: Tensor) -> bool:
    return t.is_cuda and not _force_reference
