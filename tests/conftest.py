"""Suite-wide settings and fixtures: one intra-op thread per test process (pytest -n 2 on a
2-core CI box would otherwise oversubscribe the cores and run many times slower), and the small
prepared corpus (stdlib sources, byte tokenizer) that trainer runs read, built once per worker.
PYTHONFAULTHANDLER reaches the processes tests spawn (gloo ranks, trainers): a rank that crashes in
C++ prints its Python stack instead of only "terminated with signal SIGSEGV"."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from data_pipeline.demo_corpus import stdlib_sources
    from data_pipeline.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("corpus")
    # ~24 files of whichever stdlib runs the tests: a 0.3 validation fraction keeps the (hash-chosen)
    # validation split non-empty for any Python version (a 0.1 fraction left it empty on 3.12).
    files = stdlib_sources(600_000)
    prepare(PrepareConfig(inputs=[str(f) for f in files], tokenizer="byte", out=out, shard_tokens=1 << 13,
                          val_fraction=0.3, workers=1, input_format="text", job_bytes=1 << 18, progress=False))
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow (multi-process) tests run first, in their order: a minutes-long test that
    started last would keep one worker busy while the other had nothing left (with `make test`'s
    work stealing, the fast tests at the end even out the two workers instead)."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)
