"""RUN_DIR/summary.json: the result of a run, for scripts and sweeps that should not parse logs."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Atomic write (temp file + rename): a reader never sees half a summary."""
    path = Path(run_dir) / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
