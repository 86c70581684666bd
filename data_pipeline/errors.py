"""One error type for bad input, so every message has the same shape: what, where, how to fix."""
from __future__ import annotations


class DataInputError(ValueError):
    """Bad user input detected at start. The message is one line naming the file, field and fix."""

    def __init__(self, path: object, field: str, problem: str, fix: str) -> None:
        self.path, self.field, self.problem, self.fix = str(path), field, problem, fix
        super().__init__(f"{self.path}: {field}: {problem}; fix: {fix}")
