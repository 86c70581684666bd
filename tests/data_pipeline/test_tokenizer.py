from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.errors import DataInputError
from data_pipeline.tokenizer import ByteTokenizer, load_tokenizer


def _train(tmp_path, specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world " * 20, "def f(x): return x"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_byte_tokenizer_roundtrip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode("héllo ☃")
    assert max(ids) < 256 and tok.decode(ids) == "héllo ☃"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)


def test_json_tokenizer_finds_bos_eos(tmp_path):
    tok = load_tokenizer(_train(tmp_path, ["<|bos|>", "<|eos|>"]))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.vocab_size == len(Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab())


def test_a_vocabulary_with_gaps_in_its_ids_sizes_the_embedding_past_the_largest_id(tmp_path):
    """tokenizers counts ids, not the largest + 1: BOS/EOS at 40/41 in a 30-token vocabulary would
    index past the embedding at the first forward."""
    import json

    vocab = {**{c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}, "[UNK]": 27, "<|bos|>": 40, "<|eos|>": 41}
    special = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for c, i in (("<|bos|>", 40), ("<|eos|>", 41))]
    path = tmp_path / "gaps.json"
    path.write_text(json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
                                "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
                                "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}))
    tok = load_tokenizer(path)
    assert Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True) == 30
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (40, 41, 42)


def test_text_that_spells_a_special_token_is_text(tmp_path):
    """A document quoting "<|eos|>" (code, a web page about tokenizers) must not get the EOS id:
    that is a false document boundary inside it, which document masking would then cut at."""
    tok = load_tokenizer(_train(tmp_path, ["<|bos|>", "<|eos|>"]))
    text = "x = '<|eos|>' if end else '<|bos|>'"
    import pickle

    in_a_worker = pickle.loads(pickle.dumps(tok))  # as prepare's worker processes get it
    for ids in (tok.encode(text), tok.encode_batch([text])[0], in_a_worker.encode_batch([text])[0]):
        assert tok.bos_id not in ids and tok.eos_id not in ids and tok.decode(ids) == text


def test_gpt2_style_single_special_serves_as_bos_and_eos(tmp_path):
    tok = load_tokenizer(_train(tmp_path, ["<|endoftext|>"]))
    assert tok.bos_id == tok.eos_id == 0


def test_tokenizer_without_specials_is_a_clear_error(tmp_path):
    with pytest.raises(DataInputError, match="eos_token.*fix"):
        load_tokenizer(_train(tmp_path, []))


@pytest.mark.parametrize("bad", ["nope.json", "README"])
def test_unknown_tokenizer(tmp_path, bad):
    path = tmp_path / bad
    if bad == "README":
        path.write_text("not json")
    with pytest.raises(DataInputError) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value) and "fix:" in str(err.value) and "\n" not in str(err.value)


def test_prepared_dir_records_tokenizer(tmp_path):
    from data_pipeline.prepare import PrepareConfig, prepare

    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "def f(x): return x"}\n')
    tok_path = _train(tmp_path, ["<|bos|>", "<|eos|>"])
    prepare(PrepareConfig([str(tmp_path / "a.jsonl")], str(tok_path), tmp_path / "out", val_fraction=0,
                          workers=1, progress=False))
    tok = load_tokenizer(tmp_path / "out")
    assert tok.encode("hello") == load_tokenizer(tok_path).encode("hello")
    (tmp_path / "out" / "tokenizer.json").write_text(tok_path.read_text() + "\n")  # same vocab, other file
    with pytest.raises(DataInputError, match="sha256"):
        load_tokenizer(tmp_path / "out")



def _sentencepiece_style(tmp_path):
    """A Metaspace BPE with byte fallback over a character vocabulary, as Llama-style tokenizers
    are built: what it lacks (non-ASCII) is spelled as <0xNN> byte tokens."""
    chars = sorted(set("helowrdtunx") | {"\u2581"})
    vocab = {"<s>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, **{c: 258 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    path = tmp_path / "sp.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("kind", ["byte", "byte-level BPE", "sentencepiece-style"])
def test_token_bytes_add_up_to_the_texts_bytes(tmp_path, kind):
    """Bits per byte count each token's own bytes, so any cut of the ids (a character split between
    tokens, or between validation rows) adds up to the text's UTF-8 bytes - decoding the pieces
    apart counts U+FFFD's 3 bytes for each piece of a character."""
    if kind == "byte":
        tok = load_tokenizer("byte")
    elif kind == "byte-level BPE":
        tok = load_tokenizer(_train(tmp_path, ["<|bos|>", "<|eos|>"]))
    else:
        tok = load_tokenizer(_sentencepiece_style(tmp_path), "<s>", "</s>")
    text = "hello wörld 世界 return ☃ x"
    ids, sizes = tok.encode(text), tok.token_bytes()
    assert tok.decode(ids).strip() == text and len(sizes) == tok.vocab_size
    assert sizes[tok.bos_id] == sizes[tok.eos_id] == 0
    prefix_space = kind == "sentencepiece-style"  # Metaspace prepends a space to the text
    assert sum(sizes[i] for i in [tok.bos_id, *ids, tok.eos_id]) == len(text.encode("utf-8")) + prefix_space
    cut = next(k for k in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:k]))  # inside "ö"
    assert len(tok.decode(ids[:cut]).encode()) + len(tok.decode(ids[cut:]).encode()) > len(text.encode()) + 1


def test_prepare_takes_special_tokens_by_name_and_the_prepared_dir_keeps_their_ids(tmp_path, capsys):
    """A tokenizer whose document markers have none of the usual names (chat-style <|im_start|> /
    <|im_end|>): prepare says which option to pass, takes them by name, and everything that reads the
    prepared dir later (evaluation, export) gets the ids the shards were written with."""
    from data_pipeline.manifest import read_manifest
    from data_pipeline.prepare import main

    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "def f(x): return x"}\n')
    tok_path = _train(tmp_path, ["<|im_start|>", "<|im_end|>", "<|pad|>"])
    argv = ["--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tok_path), "--val-fraction", "0",
            "--workers", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "eos_token: no special token among" in err and "--eos-token" in err
    main([*argv, "--bos-token", "<|im_start|>", "--eos-token", "<|im_end|>"])
    assert (read_manifest(tmp_path / "out").bos_id, read_manifest(tmp_path / "out").eos_id) == (0, 1)
    tok = load_tokenizer(tmp_path / "out")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.identity == read_manifest(tmp_path / "out").tokenizer
    # the tokenizer.json itself, checked against the record (`export --tokenizer` for moved data)
    recorded = read_manifest(tmp_path / "out").tokenizer
    assert load_tokenizer(tok_path, recorded=recorded).identity == recorded
    other = _train(tmp_path / "out", ["<|im_start|>", "<|im_end|>"])  # overwrites the prepared dir's copy
    with pytest.raises(DataInputError, match="sha256: not the tokenizer.json the data was prepared with"):
        load_tokenizer(other, recorded=recorded)
    with pytest.raises(DataInputError, match="sha256: not the tokenizer.json the data was prepared with"):
        load_tokenizer(tmp_path / "out")


@pytest.mark.parametrize("case, expected", [
    ("plain_vocabulary_entry", r"bos_token: 'hello' is not a special token of this tokenizer .*; fix: pass "
                               r"--bos-token one of \['<\|eos\|>'\]"),
    ("byte", r"byte: --bos-token/--eos-token: name special tokens of a tokenizer.json only"),
])
def test_special_token_names_that_cannot_be_used_are_refused(tmp_path, case, expected):
    from data_pipeline.prepare import PrepareConfig, prepare

    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n')
    tokenizer = "byte" if case == "byte" else str(_train(tmp_path, ["<|eos|>"]))
    with pytest.raises(DataInputError, match=expected):
        prepare(PrepareConfig([str(tmp_path / "a.jsonl")], tokenizer, tmp_path / "out", bos_token="hello",
                              val_fraction=0, workers=1, progress=False))
    assert not (tmp_path / "out").exists()
