"""One error type for bad input, so every message has the same shape: what, where, how to fix."""
from __future__ import annotations

from pathlib import Path


class DataInputError(ValueError):
    """Bad input: found at start, or mid-run once nothing usable is left. One line: file, field, fix."""

    def __init__(self, path: object, field: str, problem: str, fix: str) -> None:
        self.path, self.field, self.problem, self.fix = str(path), field, problem, fix
        super().__init__(f"{self.path}: {field}: {problem}; fix: {fix}")

    def __reduce__(self):
        """Pickle by the four fields, so an error raised in a worker process reaches the parent whole."""
        return self.__class__, (self.path, self.field, self.problem, self.fix)


def make_dir(path: Path, flag: str = "--out") -> None:
    """mkdir -p `path`, or a one-line DataInputError naming `flag`: a file in the way, no permission,
    a read-only filesystem."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataInputError(path, flag, f"cannot create the directory ({e.strerror or e})",
                             "pass a writable directory path") from None
