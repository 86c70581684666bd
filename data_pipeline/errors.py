"""One error type for bad input, so every message has the same shape: what, where, how to fix."""
from __future__ import annotations


class DataInputError(ValueError):
    """Bad input: found at start, or mid-run once nothing usable is left. One line: file, field, fix."""

    def __init__(self, path: object, field: str, problem: str, fix: str) -> None:
        self.path, self.field, self.problem, self.fix = str(path), field, problem, fix
        super().__init__(f"{self.path}: {field}: {problem}; fix: {fix}")

    def __reduce__(self):
        """Pickle by the four fields, so an error raised in a worker process reaches the parent whole."""
        return self.__class__, (self.path, self.field, self.problem, self.fix)
