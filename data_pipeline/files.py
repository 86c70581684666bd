"""Writing files without leaving a torn or half-made one behind: what every command that writes
results (manifests, summaries, evaluation and scaling results) shares."""
from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.errors import DataInputError


def make_dir(path: Path, flag: str = "--out") -> None:
    """mkdir -p `path`, or a one-line DataInputError naming `flag`: a file in the way, no permission,
    a read-only filesystem."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataInputError(path, flag, f"cannot create the directory ({e.strerror or e})",
                             "pass a writable directory path") from None


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so readers see the old file or the whole new one, never a torn one; a
    write that fails (a full disk) leaves no temp file behind. The temp name carries the pid:
    several writers never share one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
