"""Training and validation loaders: packed [batch, seq_len + 1] windows, endless and exactly resumable.

Data order is defined over `num_streams` canonical streams (see streams.py), so the sequence of
global batches is the same for every dp_size dividing num_streams, and state is per stream.
Workers produce chunks of windows per stream together with the stream's state after each
window; the main process assembles batches in canonical order and keeps the state of exactly
the windows it has yielded, so prefetching never leaks into `state_dict()`.

Checkpointing: `state_dict()` holds only this rank's streams. Resuming on the same dp_size needs
only the rank's own dict; resuming on another dp_size needs the streams of every old rank: save
every rank's dict and pass the list, `load_state_dict([sd_rank0, sd_rank1, ...])` (the trainer
all-gathers them into its train state). Under DCP, save per-rank dicts under a per-rank key.
"""
from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.documents import MixtureDocuments, SequentialDocuments, Source, load_sources
from data_pipeline.errors import DataInputError
from data_pipeline.manifest import MANIFEST_FILE
from data_pipeline.packing import DocumentsExhausted, Packer
from data_pipeline.stream_state import SKIP_REASONS, StreamState
from data_pipeline.streams import check_layout, check_rank, global_row_indices, rank_streams, worker_streams

log = logging.getLogger(__name__)

STATE_FORMAT = "data_pipeline.loader/2"


@dataclass(frozen=True)
class LoaderConfig:
    seq_len: int
    batch_size: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    num_workers: int = 0
    num_streams: int = 64
    emit_doc_boundaries: bool = False
    verify_checksums: bool = True  # sha256 of each shard when opened: catches bit rot, costs ~1 s/GB
    chunk_tokens: int = 1 << 18  # tokens per worker->main transfer: amortises IPC, bounds prefetch memory


class _WindowProducer(IterableDataset):
    """Runs in each worker (or in-process): the packers of the worker's streams, chunk by chunk."""

    def __init__(self, sources: list[Source], cfg: LoaderConfig, streams: list[int], states: dict[int, np.ndarray]):
        self.sources, self.cfg, self.streams, self.states = sources, cfg, streams, states

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = worker_streams(self.streams, info.id, info.num_workers) if info else self.streams
        cfg, m = self.cfg, self.sources[0].manifest
        width = cfg.seq_len + 1
        packers = []
        for s in mine:
            st = StreamState(len(self.sources), self.states[s])
            docs = MixtureDocuments(self.sources, s, cfg.num_streams, cfg.seed, st, cfg.verify_checksums)
            packers.append((st, Packer(docs, st, m.bos_id, m.eos_id)))
        per_stream = max(1, cfg.chunk_tokens // (len(mine) * width))
        while True:
            tokens = np.empty((len(mine), per_stream, width), np.int32)
            starts = np.empty((len(mine), per_stream, width), np.bool_)
            states = np.empty((len(mine), per_stream, len(packers[0][0].v)), np.int64)
            for i, (st, packer) in enumerate(packers):
                for j in range(per_stream):
                    packer.fill(tokens[i, j], starts[i, j])
                    states[i, j] = st.v
            item = {"streams": np.asarray(mine), "tokens": tokens, "states": states}
            if cfg.emit_doc_boundaries:
                item["doc_starts"] = starts
            yield item


def _ignore_preemption_signals(_worker_id: int) -> None:
    """Schedulers signal every process of a job (slurmstepd, a pod's TERM): a worker that died of
    it would fail the training process before it could save. The trainer acts on the signal and
    stops its workers itself."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _check_shape(seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise DataInputError("loader", "seq_len/batch_size", f"{seq_len}/{batch_size}", "both must be >= 1")


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else x


def _warn_if_shorter_than_a_row(sources: list[Source], seq_len: int) -> None:
    """A training split with fewer tokens than one row trains, but every row repeats the same
    documents: almost always a wrong data.seq_len or data directory."""
    for s in sources:
        tokens = sum(shard.num_tokens for shard in s.shards("train"))
        if tokens < seq_len + 1:
            log.warning("%s: its training split has %s tokens, fewer than one row of data.seq_len=%d: every row "
                        "repeats the same documents; check data.seq_len and data.sources", s.path, f"{tokens:,}",
                        seq_len)


class TrainLoader:
    """Endless iterable of {"tokens": LongTensor[batch_size, seq_len + 1]} (+ "doc_starts": BoolTensor of
    the same shape, True at each document's BOS, with `emit_doc_boundaries`: document masking)."""

    def __init__(self, sources: list[Source], cfg: LoaderConfig):
        _check_shape(cfg.seq_len, cfg.batch_size)
        check_layout(cfg.num_streams, cfg.dp_rank, cfg.dp_size)
        self.sources, self.cfg = sources, cfg
        if cfg.dp_rank == 0:
            _warn_if_shorter_than_a_row(sources, cfg.seq_len)
        self.streams = rank_streams(cfg.dp_rank, cfg.dp_size, cfg.num_streams)
        self._states = {s: StreamState(len(sources)).snapshot() for s in self.streams}
        self._global_windows = 0

    @property
    def global_rows(self) -> list[int]:
        """Local row i of every batch is row global_rows[i] of the global batch (see streams.py)."""
        return global_row_indices(self.cfg.dp_rank, self.cfg.dp_size, self.cfg.batch_size, self._global_windows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        producer = _WindowProducer(self.sources, cfg, self.streams, dict(self._states))
        workers = min(cfg.num_workers, len(self.streams))
        items = iter(DataLoader(producer, batch_size=None, num_workers=workers, prefetch_factor=2,
                                worker_init_fn=_ignore_preemption_signals) if workers > 0 else producer)
        buffers: dict[int, deque] = {s: deque() for s in self.streams}
        rows, global_batch = self.global_rows, cfg.dp_size * cfg.batch_size
        while True:
            picked = []
            for j in rows:
                s = (self._global_windows + j) % cfg.num_streams
                while not buffers[s]:
                    self._route(next(items), buffers)
                picked.append((s, buffers[s].popleft()))
            # numpy widens to int64: torch's int32->int64 copy measured ~100x slower here
            batch = {"tokens": torch.from_numpy(np.stack([w[0] for _, w in picked]).astype(np.int64))}
            if cfg.emit_doc_boundaries:
                batch["doc_starts"] = torch.from_numpy(np.stack([w[1] for _, w in picked]))
            for s, w in picked:  # in row order, so each stream ends at its last window in this batch
                self._states[s] = w[2]
            self._global_windows += global_batch
            yield batch

    @staticmethod
    def _route(item: dict, buffers: dict[int, deque]) -> None:
        tokens, states = _as_numpy(item["tokens"]), _as_numpy(item["states"])
        starts = _as_numpy(item["doc_starts"]) if "doc_starts" in item else None
        for i, s in enumerate(_as_numpy(item["streams"]).tolist()):
            for j in range(tokens.shape[1]):
                buffers[s].append((tokens[i, j], None if starts is None else starts[i, j], states[i, j]))

    def state_dict(self) -> dict:
        """Plain-python state of this rank's streams after the batches yielded so far."""
        return {"format": STATE_FORMAT, "num_streams": self.cfg.num_streams, "seed": self.cfg.seed,
                "sources": [[str(s.path), s.weight] for s in self.sources],
                "source_digests": [s.manifest.digest for s in self.sources],
                "source_data_digests": [s.manifest.data_digest for s in self.sources],
                "global_windows": self._global_windows,
                "stream_ids": list(self.streams), "stream_states": [self._states[s].tolist() for s in self.streams]}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from one rank's state, a gathered state, or a list of every old rank's state."""
        merged = merge_state_dicts(state if isinstance(state, list) else [state])
        expect = {"num_streams": self.cfg.num_streams, "seed": self.cfg.seed, "sources": self._source_keys(merged)}
        for key, value in expect.items():
            if merged[key] != value:
                raise DataInputError("loader state", key, f"checkpoint has {merged[key]!r}, loader has {value!r}",
                                     f"build the loader with the checkpoint's {key}")
        by_id = dict(zip(merged["stream_ids"], merged["stream_states"]))
        missing = [s for s in self.streams if s not in by_id]
        if missing:
            raise DataInputError("loader state", "stream_ids", f"streams {missing[:4]}... of this rank are absent",
                                 "pass the list of every old rank's state_dict() (dp_size changed)")
        self._states = {s: np.asarray(by_id[s], np.int64) for s in self.streams}
        self._global_windows = merged["global_windows"]

    def _source_keys(self, saved: dict) -> list[list]:
        """This loader's sources as `saved` names them: the i-th source is the saved i-th one when
        its path is the same (as written or resolved) or, where the state holds the data's digests,
        when its manifest's digest is (the same data moved, re-mounted); else its own path. Other
        data at the saved path (prepared again, another corpus) is refused: the saved stream
        positions would point into it."""
        digests = saved.get("source_digests", [None] * len(saved["sources"]))
        data_digests = saved.get("source_data_digests", [None] * len(saved["sources"]))
        keys = []
        for i, s in enumerate(self.sources):
            old = saved["sources"][i][0] if i < len(saved["sources"]) else None
            same_path = old is not None and (old == str(s.path) or Path(old).resolve() == s.path.resolve())
            if same_path and data_digests[i] not in (None, s.manifest.data_digest):
                raise DataInputError(s.path / MANIFEST_FILE, f"data.sources[{i}]",
                                     f"the data differs from what the checkpoint trained on (shards and tokenizer "
                                     f"digest {s.manifest.data_digest}, checkpoint {data_digests[i]}: prepared "
                                     "again or replaced)",
                                     "resume with the data the run trained on, or start a new run from these weights "
                                     "with --checkpoint.init_from")
            same = same_path or (old is not None and digests[i] == s.manifest.digest)
            keys.append([old if same else str(s.path), s.weight])
        return keys

    def metrics(self) -> dict[str, float]:
        """Counters over this rank's streams for the yielded batches, plus prepare-time skips."""
        states = [StreamState(len(self.sources), v) for v in self._states.values()]
        out: dict[str, float] = {f"skipped/{r}": float(sum(st.skips[i] for st in states))
                                 for i, r in enumerate(SKIP_REASONS)}
        tokens = np.sum([st.source_tokens for st in states], axis=0)
        docs = np.sum([st.source_docs for st in states], axis=0)
        out["tokens_read"], out["docs_read"] = float(tokens.sum()), float(docs.sum())
        total_w = sum(s.weight for s in self.sources)
        for k, src in enumerate(self.sources):
            out[f"mixture/{src.name}/target"] = src.weight / total_w
            out[f"mixture/{src.name}/realised"] = float(tokens[k] / max(tokens.sum(), 1))
            for reason, n in src.manifest.skipped.items():
                out[f"prepare_skipped/{reason}"] = out.get(f"prepare_skipped/{reason}", 0.0) + n
        return out


def merge_state_dicts(states: list[dict]) -> dict:
    """Union of the per-rank states of one checkpoint (all ranks stop after the same global batch).

    tp/pp/cp peers hold the same streams in the same state; the first copy of each stream is kept.
    """
    if not states:
        raise DataInputError("loader state", "states", "empty list", "pass every old rank's state_dict()")
    for s in states:
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            found = s.get("format") if isinstance(s, dict) else type(s).__name__
            raise DataInputError("loader state", "format", f"{found!r} is not {STATE_FORMAT!r}",
                                 "pass what TrainLoader.state_dict() returned")
    if len({s["global_windows"] for s in states}) != 1:
        raise DataInputError("loader state", "global_windows", "ranks saved at different steps",
                             "pass the states of one checkpoint")
    merged = dict(states[0], stream_ids=[], stream_states=[])
    for s in states:
        for sid, vec in zip(s["stream_ids"], s["stream_states"]):
            if sid not in merged["stream_ids"]:
                merged["stream_ids"].append(sid)
                merged["stream_states"].append(vec)
    return merged


class ValLoader:
    """Finite, deterministic: the validation split packed in manifest order (a mixture's sources
    interleaved by weight, `SequentialDocuments`); full global batches only."""

    def __init__(self, sources: list[Source], seq_len: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 max_batches: int | None = None, emit_doc_boundaries: bool = False):
        _check_shape(seq_len, batch_size)
        check_rank(dp_rank, dp_size)
        self.sources, self.seq_len, self.batch_size = sources, seq_len, batch_size
        self.dp_rank, self.dp_size, self.max_batches = dp_rank, dp_size, max_batches
        self.emit_doc_boundaries = emit_doc_boundaries
        self.rows = global_row_indices(dp_rank, dp_size, batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        m = self.sources[0].manifest
        st = StreamState(len(self.sources))
        packer = Packer(SequentialDocuments(self.sources, st), st, m.bos_id, m.eos_id)
        global_batch, n = self.dp_size * self.batch_size, 0
        tokens = np.empty((global_batch, self.seq_len + 1), np.int64)
        starts = np.empty((global_batch, self.seq_len + 1), np.bool_)
        while self.max_batches is None or n < self.max_batches:
            try:
                for j in range(global_batch):
                    packer.fill(tokens[j], starts[j])
            except DocumentsExhausted:
                return
            batch = {"tokens": torch.from_numpy(tokens[self.rows].copy())}
            if self.emit_doc_boundaries:
                batch["doc_starts"] = torch.from_numpy(starts[self.rows].copy())
            n += 1
            yield batch


def build_train_loader(sources: list[tuple[str, float]], seq_len: int, batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1, seed: int = 0, num_workers: int = 0, num_streams: int = 64,
                       emit_doc_boundaries: bool = False, verify_checksums: bool = True) -> TrainLoader:
    cfg = LoaderConfig(seq_len, batch_size, dp_rank, dp_size, seed, num_workers, num_streams, emit_doc_boundaries,
                       verify_checksums)
    return TrainLoader(load_sources(sources), cfg)


def build_val_loader(sources: list[tuple[str, float]], seq_len: int, batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, max_batches: int | None = None,
                     emit_doc_boundaries: bool = False) -> ValLoader:
    return ValLoader(load_sources(sources), seq_len, batch_size, dp_rank, dp_size, max_batches, emit_doc_boundaries)
