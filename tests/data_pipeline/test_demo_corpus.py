"""The embedded demo corpus: real stdlib text, a trained byte-level BPE, deterministic."""
from __future__ import annotations

import json

import pytest

from data_pipeline.demo_corpus import build_demo_corpus, stdlib_sources
from data_pipeline.loader import build_train_loader
from data_pipeline.tokenizer import load_tokenizer


def test_demo_corpus_is_deterministic_and_loadable(tmp_path):
    kw = {"max_bytes": 1 << 20, "vocab_size": 1024, "shard_tokens": 1 << 13, "workers": 1}
    a, b = build_demo_corpus(tmp_path / "a", **kw), build_demo_corpus(tmp_path / "b", **kw)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["shards"] == mb["shards"] and ma["tokenizer"] == mb["tokenizer"]
    assert ma["vocab_size"] == 1024 and len(ma["shards"]) > 10
    tok = load_tokenizer(a)
    assert tok.decode(tok.encode("def main():\n    return 0\n")) == "def main():\n    return 0\n"
    batch = next(iter(build_train_loader([(str(a), 1.0)], 64, 2, num_streams=8)))
    assert batch["tokens"][0, 0] == tok.bos_id
    first_doc = batch["tokens"][0, 1:].tolist()
    specials = {tok.bos_id, tok.eos_id}
    piece = tok.decode(first_doc[:next((i for i, t in enumerate(first_doc) if t in specials), len(first_doc))])
    sources = [f.read_text(errors="replace") for f in stdlib_sources(1 << 20)]
    assert len(piece) > 20 and any(piece in text for text in sources)  # real stdlib text, decoded back
    assert build_demo_corpus(tmp_path / "a", **kw) == a  # re-running finds everything done


@pytest.mark.parametrize("args, says", [(["--max-bytes", "0"], "--max-bytes: not positive"),
                                        (["--out-is-a-file"], "--out: cannot create the directory")])
def test_bad_arguments_are_one_line_with_status_2(tmp_path, capsys, args, says):
    from data_pipeline.demo_corpus import main

    out = tmp_path / "demo"
    if args == ["--out-is-a-file"]:
        out.write_text("")
        args = []
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1
