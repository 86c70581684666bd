"""Document masking under cp=2 and tp=2 (gloo) equals one process: every architecture in float64
(every gradient to 1e-10), documents with boundaries exactly on CP shard edges and spanning them
(layout_check.DOC_STARTS), in one 2-process launch."""
from __future__ import annotations

import pytest

from test_model_parallel_layouts import ARCHS, check, run

pytestmark = pytest.mark.slow


def test_cp2_and_tp2_document_masking_match_one_process(tmp_path):
    cases = [(f"float64 {dims} {arch} {overrides} masked", arch, overrides, dims, "float64", {"document_masking": True})
             for dims in ({"cp": 2}, {"tp": 2}) for arch, overrides in ARCHS]
    check(run(2, cases, tmp_path))
