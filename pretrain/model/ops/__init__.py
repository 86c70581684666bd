"""Kernel dispatch: one function per op, a pure-PyTorch reference beside it.

The reference is the CPU path and the test oracle; on CUDA the op uses the fast kernel when its
package is installed. GPU packages are imported lazily, only for CUDA tensors.
"""

from pretrain.model.ops.attention import attention, attention_reference, causal_suffix_attention, document_attention
from pretrain.model.ops.conv import causal_conv1d, causal_conv1d_reference, causal_conv1d_step
from pretrain.model.ops.cross_entropy import chunked_cross_entropy, cross_entropy_reference
from pretrain.model.ops.dispatch import reference_kernels
from pretrain.model.ops.gated_norm import gated_rms_norm, gated_rms_norm_reference
from pretrain.model.ops.grouped_mm import grouped_mm, grouped_mm_reference
from pretrain.model.ops import library  # noqa: F401  (registers the torch.ops.pretrain custom ops)
from pretrain.model.ops.ssd import ssd_scan, ssd_scan_reference

__all__ = [
    "attention", "attention_reference", "causal_conv1d", "causal_suffix_attention", "causal_conv1d_reference", "causal_conv1d_step",
    "document_attention",
    "chunked_cross_entropy", "cross_entropy_reference", "gated_rms_norm", "gated_rms_norm_reference", "grouped_mm", "grouped_mm_reference", "reference_kernels",
    "ssd_scan", "ssd_scan_reference",
]
