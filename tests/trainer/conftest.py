"""A small prepared corpus (stdlib sources, byte tokenizer), built once per test session/worker."""
from pathlib import Path

import pytest


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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """In-process runs share 2 cores with another xdist worker: 2 OpenMP threads each would spin
    against each other. Subprocess runs get OMP_NUM_THREADS=1 the same way (trainer_helpers.launch)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
