"""Document structure of packed rows, for document-masked training (`data.document_masking`).

Passed to the model (and by every block to its mixer) in place of the positions tensor, so mixer
signatures keep one shape: a mixer given `PackedDocs` keeps every token inside its document
(attention block-causal per document, RoPE positions restarting at 0, the Mamba2 conv and scan
reset at each document start); given a positions tensor it runs exactly as without masking.

A batch whose rows each lie in one document (no start after a row's first token) needs no mask:
`masking_needed` tells the trainer so from the loader's CPU starts, and the batch then runs the
unmasked kernels (cuDNN causal attention, Mamba2 without seq_idx) - exact, and free of the masked
kernels' cost. Long documents (more than a window) make such batches common.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.context_parallel import all_gather_sequence, to_natural_order
from pretrain.model.shared_dict import SharedDict


@dataclass(frozen=True, eq=False)
class PackedDocs:
    """`positions` [b, l]: each token's position within its document; `doc` [b, l]: its document's
    index in the row (non-decreasing along the row; only equality is used). A carried-in state
    (KV / conv / SSM cache) belongs to the document of the row's first token. `kernel_cache` holds
    per-batch kernel metadata (FlexAttention block masks, conv fix-up indices, CP-gathered
    positions and document ids), built once and shared by the layers (a `SharedDict`: FSDP2's
    input cast keeps it)."""

    positions: Tensor
    doc: Tensor
    kernel_cache: SharedDict = field(default_factory=SharedDict, repr=False)

    @staticmethod
    def from_starts(starts: Tensor) -> PackedDocs:
        """From a [b, l] bool mask of document starts (the loader's `doc_starts`, BOS positions).
        The first token starts a document whether marked or not (a window may begin mid-document)."""
        starts = starts.clone()
        starts[:, 0] = True
        doc = starts.long().cumsum(1) - 1
        index = torch.arange(starts.shape[1], device=starts.device).expand_as(doc)
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
        return PackedDocs(index - first, doc)

    def select(self, index: Tensor) -> PackedDocs:
        """The tokens at `index` (e.g. a context-parallel rank's shard_index)."""
        return PackedDocs(self.positions[:, index], self.doc[:, index])

    def gathered(self, group: dist.ProcessGroup) -> tuple[Tensor, Tensor]:
        """Every CP rank's (positions, document ids) [b, L] in position order: attention's keys',
        the Mamba2 scan's tokens'. All-gathered once per batch and shared by the layers through
        `kernel_cache` (a compiled block gathers its own). Both in one collective."""
        key = ("cp_gathered", id(group))
        found = None if torch.compiler.is_compiling() else self.kernel_cache.get(key)
        if found is None:
            both = torch.stack([self.positions, self.doc.to(self.positions.dtype)])  # [2, b, l]
            positions, doc = to_natural_order(all_gather_sequence(both, group, dim=2), group, dim=2)
            found = (positions, doc.to(self.doc.dtype))
            if not torch.compiler.is_compiling():
                self.kernel_cache[key] = found
        return found

    def next_token(self) -> PackedDocs:
        """The decoding step after the last token: same document, next position."""
        return PackedDocs(self.positions[:, -1:] + 1, self.doc[:, -1:])




def masking_needed(starts: Tensor) -> bool:
    """Whether any row of the [b, l] document starts (the inputs' columns of the loader's
    `doc_starts`) has a start after its first token. When none has, each row is one document (or
    the rest of one): positions 0..l-1, causal attention and a fresh Mamba2 state are then exactly
    the masked result, so the unmasked path runs. Decided on the loader's CPU tensor, before the
    batch moves to the device (no device sync), from the rows alone: CP, TP and PP peers, which
    hold the same rows, decide alike."""
    if starts.device.type != "cpu":
        raise ValueError("masking_needed takes the loader's CPU doc_starts (deciding on a device tensor would "
                         "sync): call it before moving the batch to the device")
    return bool(starts[:, 1:].any())


def without_unneeded_starts(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The loader's CPU batch without its `doc_starts` when no row needs the mask (`masking_needed`
    on the inputs' columns): the trainer, its validation and the nll suite then run the unmasked
    kernels. Decided once per micro-batch, before the move to the device."""
    if "doc_starts" in batch and not masking_needed(batch["doc_starts"][:, :-1]):
        return {k: v for k, v in batch.items() if k != "doc_starts"}
    return batch
