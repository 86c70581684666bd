"""RUN_DIR/summary.json: the result of a run, for scripts and sweeps that should not parse logs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from data_pipeline.files import write_atomic

SUMMARY_FILE = "summary.json"


def finite_or_null(values: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf (e.g. no validation yet) as None: strict JSON readers (jq, JavaScript) reject them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Atomic write (temp file + rename): a reader never sees half a summary; NaN/inf as null."""
    path = Path(run_dir) / SUMMARY_FILE
    write_atomic(path, json.dumps(finite_or_null(summary), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
