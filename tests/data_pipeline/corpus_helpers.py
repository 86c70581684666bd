"""Build tiny corpora for the data pipeline tests: distinguishable documents, jsonl, prepared shards."""
from __future__ import annotations

import json
import random
from pathlib import Path

from data_pipeline.prepare import PrepareConfig, prepare


def random_docs(n: int, seed: int, alphabet: str, mean_len: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{i:05d} " + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 2 * mean_len)))
            for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def prepare_docs(tmp: Path, docs: list[str], shard_tokens: int = 2000, val_fraction: float = 0.1,
                 **kw) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(tmp / "input.jsonl", docs)
    out = tmp / "prepared"
    prepare(PrepareConfig([str(src)], "byte", out, shard_tokens=shard_tokens, val_fraction=val_fraction,
                          workers=1, progress=False, **kw))
    return out
