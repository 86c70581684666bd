"""Where packed windows get their documents: shuffled per canonical stream, or in file order.

A stream's sources are read unit by unit (a unit is a shard, or a 1/k part of one when a source
has fewer shards than streams). Shard order is shuffled per (source, epoch); documents are
shuffled within a unit. The shuffle buffer is thus a whole shard, which the memory map holds
anyway, and a position is three integers, so exact resume needs no buffer in the checkpoint.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataInputError
from data_pipeline.packing import DocumentsExhausted
from data_pipeline.manifest import MANIFEST_FILE, Manifest, ShardInfo, read_manifest
from data_pipeline.shard_io import ShardDocs, ShardError, read_shard
from data_pipeline.stream_state import StreamState

log = logging.getLogger(__name__)
MIX_BLOCK = 4096  # source choices drawn per RNG call; a block index + offset is the position
GIVE_UP_UNITS = 256  # a stream drops a source after min(2 x its units, this) units in a row without a document


@dataclass(frozen=True)
class Source:
    """One prepared dir of a mixture."""

    path: Path
    weight: float
    manifest: Manifest
    name: str

    def shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.manifest.split_shards(split) if s.num_docs > 0]


def load_sources(sources: list[tuple[str, float]]) -> list[Source]:
    """Read every manifest and check they agree on the tokenizer, at start."""
    if not sources:
        raise DataInputError("sources", "sources", "empty list", "pass [(prepared_dir, weight), ...]")
    out = []
    for i, (path, weight) in enumerate(sources):
        if not (math.isfinite(weight) and weight > 0):
            raise DataInputError(path, "weight", f"{weight} is not a finite positive number",
                                 "give every source a finite weight > 0")
        m = read_manifest(path)
        if out and m.tokenizer != out[0].manifest.tokenizer:
            raise DataInputError(path, "tokenizer", f"differs from {out[0].path}'s",
                                 "prepare all mixture sources with the same tokenizer")
        src = Source(Path(path), float(weight), m, f"{i}:{Path(path).name}")
        usable = src.shards("train")
        if not usable:
            raise DataInputError(src.path / MANIFEST_FILE, "shards", "no train shard holds a document",
                                 "prepare with more data or a smaller --val-fraction")
        # Stops at the first shard present: one stat when all is well, a clear error when none was copied.
        if not any(_present(src.path / s.name, s.bytes) for s in usable):
            raise DataInputError(src.path, "shards", f"none of the {len(usable)} train shards in {MANIFEST_FILE} "
                                 f"is present with its recorded size (e.g. {usable[0].name})",
                                 f"copy the shard files next to {MANIFEST_FILE}, or re-run prepare into this dir")
        out.append(src)
    return out


def _present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def doc_problem(doc: np.ndarray, vocab_size: int) -> str | None:
    """Reason a stored document is unusable (the metric it is counted under), or None."""
    if doc.size == 0:
        return "empty_docs"
    if int(doc.max()) >= vocab_size:
        return "out_of_range_ids"
    return None


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


class StreamCursor:
    """Position of one canonical stream in one source: (epoch, unit, doc), all in the state vector."""

    def __init__(self, source: Source, k: int, stream: int, num_streams: int, seed: int, state: StreamState,
                 verify: bool):
        self.src, self.k, self.stream, self.S, self.seed, self.st, self.verify = (
            source, k, stream, num_streams, seed, state, verify)
        self.shards = source.shards("train")
        self.parts = max(1, math.ceil(num_streams / len(self.shards)))
        self.dtype = source.manifest.dtype
        self.vocab = source.manifest.vocab_size
        self._units: tuple[int, np.ndarray] | None = None  # (epoch, this stream's unit ids)
        self._loaded: tuple[tuple[int, int], ShardDocs, np.ndarray] | None = None  # ((epoch, pos), docs, order)
        self._checked: tuple[int, int, int] | None = None  # cursor of the last document found usable

    def _stream_units(self, epoch: int) -> np.ndarray:
        if self._units is None or self._units[0] != epoch:
            perm = _rng(self.seed, 1, self.k, epoch).permutation(len(self.shards) * self.parts)
            self._units = (epoch, perm[self.stream::self.S])
        return self._units[1]

    def current(self) -> np.ndarray | None:
        """The document at the cursor, skipping (and counting) unusable shards and documents.

        A run of bad or empty units moves the stream on, through later epochs' units if need be.
        None (and the source marked dead for this stream) once min(2 x the source's units,
        GIVE_UP_UNITS) units in a row held no usable document: the source is, in effect, unusable.
        A part with no document by construction (a shard of fewer documents than parts: a small
        source under many streams) is passed over without counting: only failed loads and
        unusable documents are evidence. Units are counted from the cursor, not by loads, so the
        decision is the same after a resume.
        """
        st, here, tried, names = self.st, None, 0, []
        give_up = min(2 * len(self.shards) * self.parts, GIVE_UP_UNITS)
        while True:
            epoch, pos, doc = st.cursor(self.k)
            units = self._stream_units(epoch)
            if pos >= len(units):
                st.set_cursor(self.k, epoch + 1, 0, 0)
                continue
            if int(units[pos]) % self.parts >= self.shards[int(units[pos]) // self.parts].num_docs:
                st.set_cursor(self.k, epoch, pos + 1, 0)  # empty by construction, not a sign of damage
                continue
            if here != (epoch, pos):
                here, tried = (epoch, pos), tried + 1
                if tried > give_up:
                    self._give_up(tried - 1, names)
                    return None
                if len(names) < 5 and self._shard_name(int(units[pos])) not in names:
                    names.append(self._shard_name(int(units[pos])))
            if self._loaded is None or self._loaded[0] != (epoch, pos):
                if not self._load(epoch, pos, int(units[pos])):
                    st.set_cursor(self.k, epoch, pos + 1, 0)
                    continue
            _, docs, order = self._loaded
            if doc >= len(order):
                st.set_cursor(self.k, epoch, pos + 1, 0)
                continue
            i = order[doc]
            tokens = docs.tokens[docs.starts[i]:docs.ends[i]]
            if self._checked == (epoch, pos, doc):  # a long document is peeked once per window it fills
                return tokens
            problem = doc_problem(tokens, self.vocab)
            if problem is None:
                self._checked = (epoch, pos, doc)
                return tokens
            st.count_skip(problem)
            log.warning("%s: skipped a document of %s (%s)", self.src.name, self._shard_name(int(units[pos])), problem)
            st.set_cursor(self.k, epoch, pos, doc + 1)

    def _give_up(self, tried: int, names: list[str]) -> None:
        self.st.dead[self.k] = 1
        self.st.count_skip("dead_streams")
        log.warning("%s: stream %d gave up on this source: %d units in a row (shards %s...) held no usable "
                    "document; the stream goes on with the other sources", self.src.name, self.stream, tried,
                    ", ".join(names))

    def advance(self) -> None:
        epoch, pos, doc = self.st.cursor(self.k)
        self.st.set_cursor(self.k, epoch, pos, doc + 1)

    def _shard_name(self, unit: int) -> str:
        return self.shards[unit // self.parts].name

    def _load(self, epoch: int, pos: int, unit: int) -> bool:
        shard, part = self.shards[unit // self.parts], unit % self.parts
        try:
            docs = read_shard(self.src.path / shard.name, self.dtype, shard, self.verify)
        except ShardError as exc:
            self.st.count_skip(exc.reason)
            log.warning("%s: skipped shard %s (%s: %s)", self.src.name, shard.name, exc.reason, exc)
            return False
        order = np.arange(part, len(docs), self.parts)
        order = order[_rng(self.seed, 2, self.k, epoch, unit).permutation(len(order))]
        self._loaded = ((epoch, pos), docs, order)
        return True


class MixtureDocuments:
    """The document sequence of one canonical stream: a seeded weighted choice of source per document.

    Choice probabilities are weight / mean document length, so weights are token proportions.
    """

    def __init__(self, sources: list[Source], stream: int, num_streams: int, seed: int, state: StreamState,
                 verify: bool = True):
        self.cursors = [StreamCursor(s, k, stream, num_streams, seed, state, verify) for k, s in enumerate(sources)]
        p = np.array([s.weight / (s.manifest.mean_doc_tokens("train") + 2) for s in sources])
        self.probs = p / p.sum()
        self.seed, self.stream, self.st = seed, stream, state
        self._block: tuple[int, np.ndarray] | None = None

    def peek(self) -> tuple[int, np.ndarray]:
        while True:
            k = self.st.active
            if k < 0:
                k = self._choose(self.st.doc_counter)
                self.st.active = k
            doc = self.cursors[k].current()
            if doc is not None:
                return k, doc
            self.st.active = -1  # source k just died for this stream: choose again among the others

    def advance(self) -> None:
        self.cursors[self.st.active].advance()
        self.st.source_docs[self.st.active] += 1
        self.st.active = -1
        self.st.doc_counter += 1

    def _choose(self, n: int) -> int:
        k = 0 if len(self.cursors) == 1 else self._drawn(n)
        if not self.st.dead[k]:
            return k
        alive = self.st.dead == 0
        if not alive.any():
            raise DataInputError(", ".join(str(c.src.path) for c in self.cursors), "shards",
                                 f"stream {self.stream} found no usable document in any source over many units "
                                 f"in a row (every shard it tried is corrupt, fails its checksum or holds only "
                                 f"unusable documents)", "re-prepare or restore the shards; the loader's "
                                 "skipped/* metrics and warnings name the reasons and shards")
        p = self.probs * alive  # a seeded redraw among the live sources: a function of (n, dead flags)
        return int(_rng(self.seed, 4, self.stream, n).choice(len(p), p=p / p.sum()))

    def _drawn(self, n: int) -> int:
        block = n // MIX_BLOCK
        if self._block is None or self._block[0] != block:
            choices = _rng(self.seed, 3, self.stream, block).choice(len(self.cursors), MIX_BLOCK, p=self.probs)
            self._block = (block, choices)
        return int(self._block[1][n % MIX_BLOCK])


class SequentialDocuments:
    """Validation: every usable document of every source once, each source's in manifest order,
    the sources interleaved by their weights: the next document comes from the source with the
    fewest tokens so far per unit of weight, so that the first validation batches (the trainer's
    `train.val_batches`) hold the mixture in its token proportions while every source lasts,
    not the first source's documents alone."""

    def __init__(self, sources: list[Source], state: StreamState, split: str = "val"):
        self._it = self._interleave(sources, state, split)
        self._cur: tuple[int, np.ndarray] | None = next(self._it, None)

    @classmethod
    def _interleave(cls, sources: list[Source], st: StreamState, split: str):
        docs = [cls._documents(src, st, split) for src in sources]
        heads = [next(d, None) for d in docs]
        tokens = [0] * len(sources)
        while any(h is not None for h in heads):
            k = min((i for i, h in enumerate(heads) if h is not None), key=lambda i: tokens[i] / sources[i].weight)
            yield k, heads[k]
            tokens[k] += len(heads[k]) + 2  # with its BOS and EOS, as packed
            heads[k] = next(docs[k], None)

    @staticmethod
    def _documents(src: Source, st: StreamState, split: str):
        for shard in src.shards(split):
            try:
                docs = read_shard(src.path / shard.name, src.manifest.dtype, shard)
            except ShardError as exc:
                st.count_skip(exc.reason)
                log.warning("%s: skipped shard %s (%s)", src.name, shard.name, exc)
                continue
            for a, b in zip(docs.starts, docs.ends):
                tokens = docs.tokens[a:b]
                problem = doc_problem(tokens, src.manifest.vocab_size)
                if problem:
                    st.count_skip(problem)
                else:
                    yield tokens

    def peek(self) -> tuple[int, np.ndarray]:
        if self._cur is None:
            raise DocumentsExhausted
        return self._cur

    def advance(self) -> None:
        self._cur = next(self._it, None)
