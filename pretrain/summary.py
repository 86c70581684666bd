"""RUN_DIR/summary.json: the result of a run, for scripts and sweeps that should not parse logs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from data_pipeline.files import write_atomic

SUMMARY_FILE = "summary.json"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Atomic write (temp file + rename): a reader never sees half a summary. NaN/inf (e.g. no
    validation yet) become null, so strict JSON readers (jq, JavaScript) accept the file."""
    path = Path(run_dir) / SUMMARY_FILE
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
    write_atomic(path, json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
