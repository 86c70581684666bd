"""A dict that FSDP2 hands to a wrapped block as is.

FSDP2's mixed-precision input cast (`_apply_to_tensors`) rebuilds every `dict` and dataclass among a
wrapped module's arguments, so what a block writes into a plain dict argument lands in a copy: a
generation cache would lose its keys, a per-batch kernel cache would be rebuilt by every layer. A
`UserDict` is not a `dict` subclass, so the cast passes it through; Dynamo traces it like a dict.
"""
from __future__ import annotations

from collections import UserDict


class SharedDict(UserDict):
    """State the layers of one forward share by reference (see the module docstring)."""
