"""Training loader: packing, elastic determinism, exact resume, mixtures, validation."""
from __future__ import annotations

import itertools
import logging
import pickle
import random

import numpy as np
import pytest
import torch

from data_pipeline import documents
from data_pipeline.documents import MixtureDocuments, load_sources
from data_pipeline.loader import build_train_loader, build_val_loader
from data_pipeline.manifest import read_manifest
from data_pipeline.packing import Packer
from data_pipeline.shard_io import read_shard
from data_pipeline.stream_state import StreamState
from data_pipeline.streams import global_row_indices

from corpus_helpers import prepare_docs
from global_batches import assemble_global_batches

SEQ, BATCH, STREAMS = 48, 4, 8
BOS, EOS = 256, 257


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


def tokens(batches) -> list[torch.Tensor]:
    return [b["tokens"] for b in batches]


def global_batches(src, dp_size: int, n: int, batch=BATCH, state=None, **kw) -> list[torch.Tensor]:
    """Run every rank of a dp_size job for n steps and reassemble the global batches by row index."""
    return assemble_global_batches(
        lambda r: build_train_loader(src, SEQ, batch, dp_rank=r, dp_size=dp_size, num_streams=STREAMS, **kw),
        dp_size, n, state)


def all_docs(path) -> list[list[int]]:
    m = read_manifest(path)
    docs = []
    for s in m.split_shards("train"):
        sd = read_shard(path / s.name, m.dtype, s)
        docs += [sd.tokens[a:b].tolist() for a, b in zip(sd.starts, sd.ends)]
    return docs


def test_windows_pack_bos_doc_eos_across_boundaries(corpus_a):
    loader = build_train_loader([(str(corpus_a), 1.0)], SEQ, BATCH, num_streams=1, emit_doc_boundaries=True)
    batches = take(loader, 30)
    rows = [r for b in batches for r in b["tokens"]]
    for a, b in zip(rows, rows[1:]):
        assert a[-1] == b[0]  # windows overlap by one token: every token is a target once
    stream = torch.cat([rows[0]] + [r[1:] for r in rows[1:]]).tolist()
    starts = torch.cat([batches[0]["doc_starts"][0]] + [r[1:] for b in batches for r in b["doc_starts"]][1:])
    assert stream[0] == BOS and starts[0]
    assert [i for i, t in enumerate(stream) if t == BOS] == torch.nonzero(starts).flatten().tolist()
    docs, known = [], {tuple(d) for d in all_docs(corpus_a)}
    for piece in np.split(np.array(stream), [i for i, t in enumerate(stream) if t == BOS][1:])[:-1]:
        assert piece[0] == BOS and piece[-1] == EOS  # BOS starts each document, EOS ends it
        docs.append(tuple(piece[1:-1].tolist()))
    assert len(docs) > 40 and set(docs) <= known and len(set(docs)) == len(docs)
    assert all(b["tokens"].dtype == torch.long and b["tokens"].shape == (BATCH, SEQ + 1) for b in batches)


def test_a_long_document_is_checked_once_not_per_window(tmp_path, monkeypatch):
    """The usability check scans the whole document (its largest id): rerunning it for every window
    a long document fills made packing quadratic in document length."""
    src = prepare_docs(tmp_path, ["x" * 4000, "y" * 3000], shard_tokens=100_000, val_fraction=0.0)
    checked = []
    monkeypatch.setattr(documents, "doc_problem", lambda doc, vocab: checked.append(len(doc)))
    st = StreamState(1)
    packer = Packer(MixtureDocuments(load_sources([(str(src), 1.0)]), 0, 1, 0, st), st, BOS, EOS)
    window, starts = np.empty(SEQ + 1, np.int64), np.empty(SEQ + 1, bool)
    packed = 0
    for _ in range(7006 * 3 // SEQ):  # three epochs of two documents, ~150 windows
        packer.fill(window, starts)
        packed += int(starts.sum())
    assert packed >= 6 and len(checked) == packed, checked  # once per document, whatever its windows


def split_docs(stream: list[int]) -> list[tuple[int, ...]]:
    """Complete [BOS] doc [EOS] pieces of a packed token stream, as doc token tuples."""
    bos = [i for i, t in enumerate(stream) if t == BOS]
    return [tuple(stream[a + 1:b - 1]) for a, b in zip(bos, bos[1:])]


def test_endless_epochs_reshuffle(corpus_a):
    train_docs = all_docs(corpus_a)
    n_tokens = sum(len(d) + 2 for d in train_docs)
    loader = build_train_loader([(str(corpus_a), 1.0)], SEQ, BATCH, num_streams=1)
    steps = 2 * n_tokens // (SEQ * BATCH) + 5
    stream = torch.cat([r[1:] for b in take(loader, steps) for r in b["tokens"]]).tolist()
    docs = split_docs([BOS] + stream)  # the first window's BOS was dropped with r[1:]
    epoch1, epoch2 = docs[:len(train_docs)], docs[len(train_docs):2 * len(train_docs)]
    assert sorted(epoch1) == sorted(epoch2) == sorted(map(tuple, train_docs))  # every doc once per epoch
    assert epoch1 != epoch2  # in a new order


def test_seed_changes_order_and_same_seed_repeats(corpus_a):
    src = [(str(corpus_a), 1.0)]
    a = tokens(take(build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=1), 5))
    b = tokens(take(build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=1), 5))
    c = tokens(take(build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=2), 5))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_split_the_one_rank_global_batches(corpus_a, dp_size):
    src = [(str(corpus_a), 1.0)]
    one_rank = global_batches(src, 1, 6, batch=BATCH * dp_size)
    assert all(torch.equal(a, b) for a, b in zip(global_batches(src, dp_size, 6), one_rank))
    # disjoint and complete: each global row is produced by exactly one rank
    rows = [global_row_indices(r, dp_size, BATCH) for r in range(dp_size)]
    assert sorted(sum(rows, [])) == list(range(dp_size * BATCH))
    # ranks read disjoint streams, and therefore disjoint shards when shards >= streams
    streams = [set(build_train_loader(src, SEQ, BATCH, dp_rank=r, dp_size=dp_size, num_streams=STREAMS).streams)
               for r in range(dp_size)]
    assert set.union(*streams) == set(range(STREAMS)) and sum(map(len, streams)) == STREAMS


def test_tp_pp_cp_peers_get_identical_batches(corpus_a):
    src = [(str(corpus_a), 1.0)]
    a = take(build_train_loader(src, SEQ, BATCH, dp_rank=1, dp_size=2, num_streams=STREAMS, num_workers=0), 4)
    b = take(build_train_loader(src, SEQ, BATCH, dp_rank=1, dp_size=2, num_streams=STREAMS, num_workers=2), 4)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_exact_resume_at_random_points(corpus_a, corpus_b, workers):
    src = [(str(corpus_a), 0.6), (str(corpus_b), 0.4)]
    ref = tokens(take(build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3), 24))
    rng = random.Random(workers)
    for cut in sorted(rng.sample(range(1, 20), 2)):
        first = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3, num_workers=workers)
        assert all(torch.equal(x, y) for x, y in zip(tokens(take(first, cut)), ref[:cut]))
        state = pickle.loads(pickle.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3, num_workers=(workers + 1) % 4)
        resumed.load_state_dict(state)
        got = tokens(take(resumed, 24 - cut))
        assert all(torch.equal(x, y) for x, y in zip(got, ref[cut:])), f"resume at {cut} diverged"
        assert resumed.metrics()["tokens_read"] == build_metrics_after(src, 24)["tokens_read"]


def build_metrics_after(src, n):
    loader = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3)
    take(loader, n)
    return loader.metrics()


def test_state_excludes_prefetched_windows(corpus_a):
    src = [(str(corpus_a), 1.0)]
    prefetching = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, num_workers=2)
    it = iter(prefetching)
    for _ in range(3):
        next(it)
    plain = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS)
    take(plain, 3)
    assert prefetching.state_dict() == plain.state_dict()
    assert prefetching.metrics() == plain.metrics()


@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_from_two_ranks_onto_other_dp_sizes(corpus_a, corpus_b, new_dp):
    src = [(str(corpus_a), 0.5), (str(corpus_b), 0.5)]
    ref = global_batches(src, 1, 9, batch=2 * BATCH)
    states = []
    for r in range(2):
        loader = build_train_loader(src, SEQ, BATCH, dp_rank=r, dp_size=2, num_streams=STREAMS)
        take(loader, 3)
        states.append(loader.state_dict())
    peers = states + states[::-1]  # the trainer passes every world rank's state, tp/pp peers included
    got = global_batches(src, new_dp, 6, batch=2 * BATCH // new_dp, state=peers)
    assert all(torch.equal(a, b) for a, b in zip(got, ref[3:]))


def test_resume_onto_other_dp_size_needs_every_ranks_state(corpus_a):
    src = [(str(corpus_a), 1.0)]
    loader = build_train_loader(src, SEQ, BATCH, dp_rank=0, dp_size=2, num_streams=STREAMS)
    take(loader, 1)
    other = build_train_loader(src, SEQ, BATCH, dp_rank=0, dp_size=1, num_streams=STREAMS)
    with pytest.raises(ValueError, match="stream_ids.*fix: pass the list of every old rank"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="num_streams.*fix"):
        build_train_loader(src, SEQ, BATCH, num_streams=16).load_state_dict(loader.state_dict())


def test_resume_finds_its_data_moved_but_not_other_data(corpus_a, corpus_b, tmp_path):
    """The state names each source by its manifest's digest too: the same prepared data under
    another path (moved, re-mounted, a relative spelling) resumes exactly; other data is refused."""
    import shutil

    src = [(str(corpus_a), 0.5), (str(corpus_b), 0.5)]
    ref = tokens(take(build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3), 5))
    first = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3)
    take(first, 2)
    state = first.state_dict()
    moved = shutil.copytree(corpus_a, tmp_path / "elsewhere")
    resumed = build_train_loader([(str(moved), 0.5), src[1]], SEQ, BATCH, num_streams=STREAMS, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(tokens(take(resumed, 3)), ref[2:], strict=True))
    swapped = build_train_loader([src[1], src[0]], SEQ, BATCH, num_streams=STREAMS, seed=3)
    with pytest.raises(ValueError, match="sources: checkpoint has"):
        swapped.load_state_dict(state)
    # other data at the checkpoint's path: corpus_b prepared where corpus_a was
    replaced = tmp_path / "replaced"
    shutil.copytree(corpus_a, replaced)
    state["sources"][0][0] = str(replaced)
    shutil.rmtree(replaced)
    shutil.copytree(corpus_b, replaced)
    again = build_train_loader([(str(replaced), 0.5), src[1]], SEQ, BATCH, num_streams=STREAMS, seed=3)
    with pytest.raises(ValueError, match=r"manifest.json: data.sources\[0\]: the data differs from what the checkpoint"):
        again.load_state_dict(state)


def test_dp_size_must_divide_num_streams(corpus_a):
    with pytest.raises(ValueError, match="num_streams.*not divisible by dp_size 3"):
        build_train_loader([(str(corpus_a), 1.0)], SEQ, BATCH, dp_size=3, num_streams=STREAMS)


def test_mixture_proportions_are_realised_and_reported(corpus_a, corpus_b):
    src = [(str(corpus_a), 0.7), (str(corpus_b), 0.3)]
    loader = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS)
    ids = torch.cat(tokens(take(loader, 250))).flatten()
    from_a = ((ids >= ord("a")) & (ids <= ord("m"))).sum().item()
    from_b = ((ids >= ord("n")) & (ids <= ord("z"))).sum().item()
    m = loader.metrics()
    assert abs(from_a / (from_a + from_b) - 0.7) < 0.05
    assert abs(m["mixture/0:prepared/realised"] - 0.7) < 0.05 and m["mixture/0:prepared/target"] == 0.7
    assert m["tokens_read"] == 250 * BATCH * SEQ + STREAMS  # the first window of each stream has one more


@pytest.mark.parametrize("order", [1, -1])
def test_validation_of_a_mixture_holds_its_sources_in_their_weights(corpus_a, corpus_b, order):
    """The trainer validates on its first train.val_batches batches: they held the first --data
    source alone (a val/nll of one corpus, changed by reordering the flags); now the weights' share."""
    src = [(str(corpus_a), 0.25), (str(corpus_b), 0.75)][::order]
    ids = torch.cat(tokens(build_val_loader(src, SEQ, BATCH, max_batches=3))).flatten()
    from_a = ((ids >= ord("a")) & (ids <= ord("m"))).sum().item()
    from_b = ((ids >= ord("n")) & (ids <= ord("z"))).sum().item()
    assert from_a and abs(from_b / (from_a + from_b) - 0.75) < 0.1, (from_a, from_b)


def test_validation_loader_is_finite_deterministic_and_rank_split(corpus_a):
    src = [(str(corpus_a), 1.0)]
    full = tokens(build_val_loader(src, SEQ, 2 * BATCH))
    again = tokens(build_val_loader(src, SEQ, 2 * BATCH))
    assert len(full) == len(again) > 2 and all(torch.equal(a, b) for a, b in zip(full, again))
    halves = [tokens(build_val_loader(src, SEQ, BATCH, dp_rank=r, dp_size=2)) for r in range(2)]
    for step, g in enumerate(full):
        re = torch.empty_like(g)
        for r in range(2):
            re[global_row_indices(r, 2, BATCH)] = halves[r][step]
        assert torch.equal(re, g)
    assert len(tokens(build_val_loader(src, SEQ, BATCH, max_batches=2))) == 2
    m = read_manifest(corpus_a)
    val_docs = []
    for sh in m.split_shards("val"):
        sd = read_shard(corpus_a / sh.name, m.dtype, sh)
        val_docs += [tuple(sd.tokens[a:b].tolist()) for a, b in zip(sd.starts, sd.ends)]
    stream = torch.cat([full[0][0]] + [r[1:] for b in full for r in b][1:]).tolist()
    seen = split_docs(stream)
    assert len(seen) > 5 and seen == val_docs[:len(seen)]  # in manifest order, each once


def test_a_split_shorter_than_one_row_is_reported(corpus_a, caplog):
    from data_pipeline.manifest import read_manifest

    train = sum(s.num_tokens for s in read_manifest(corpus_a).shards if s.split == "train")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        build_train_loader([(str(corpus_a), 1.0)], train - 1, 1, num_streams=1)
        assert "fewer than one row" not in caplog.text  # a row of train - 1 + 1 tokens still fits
        build_train_loader([(str(corpus_a), 1.0)], train, 1, num_streams=1)
    assert f"{train:,} tokens, fewer than one row of data.seq_len={train}" in caplog.text


def test_two_sources_of_identical_data_resume(corpus_a, tmp_path):
    """Two copies of one prepared dataset in a mixture (one digest, two paths) resume as saved."""
    import shutil

    src = [(str(corpus_a), 0.5), (str(shutil.copytree(corpus_a, tmp_path / "copy")), 0.5)]
    first = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3)
    take(first, 2)
    resumed = build_train_loader(src, SEQ, BATCH, num_streams=STREAMS, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(tokens(take(resumed, 3)), tokens(take(first, 3)), strict=True))
    assert resumed.metrics() == first.metrics()  # each copy's share of the mixture too
