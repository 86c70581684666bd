"""Damaged checkpoints: each kind of damage is found, resume falls back to the previous checkpoint
that verifies (one warning naming the bad file), the run ends bit for bit as an undamaged run did,
and the damaged step is saved again when its step comes round. Nothing in a checkpoint runs code."""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointManager, find_latest_complete, verify_checkpoint
from pretrain.checkpoint_integrity import (CheckpointDamaged, FileRecord, file_digest, read_marker, share,
                                          write_marker)
from pretrain.config import ConfigError
from pretrain.summary import read_summary
from pretrain.trainer import Trainer
from trainer_helpers import losses, signal_during_step, tiny_config

STEPS = 6
DAMAGED_STEP = "step_00000004"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The undamaged run (checkpoints at steps 2, 4, 6) and its final weights."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = Trainer(tiny_config(run_dir, corpus, STEPS))
    trainer.train()
    return run_dir, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def overwrite(path: Path, data: bytes, offset: int = 0) -> None:
    """Write `data` over the file's bytes at `offset`: the size stays the same."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def garbage(path: Path, n: int = 4096) -> None:
    """Up to n random bytes written over the middle of the file."""
    size = path.stat().st_size
    n = min(n, size)
    overwrite(path, os.urandom(n), (size - n) // 2)


def distcp(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def damage(kind: str) -> Callable[[Path], str]:
    """Damage a checkpoint directory; return the name of the file damaged."""
    def truncated(ckpt: Path) -> str:
        f = distcp(ckpt)
        f.write_bytes(f.read_bytes()[:-10])
        return f.name

    def deleted(ckpt: Path) -> str:
        (ckpt / "train_state.json").unlink()
        return "train_state.json"

    def same_size_garbage(name: str) -> Callable[[Path], str]:
        def do(ckpt: Path) -> str:
            f = distcp(ckpt) if name == "distcp" else ckpt / name
            garbage(f)
            return f.name
        return do

    kinds = {"truncated .distcp": truncated, "deleted train_state.json": deleted,
             **{f"garbage in {n}": same_size_garbage(n)
                for n in ("distcp", ".metadata", "train_state.json", "config.toml", "model_config.json",
                          "COMPLETE.json")}}
    return kinds[kind]


KINDS = ["truncated .distcp", "deleted train_state.json", "garbage in distcp", "garbage in .metadata",
         "garbage in train_state.json", "garbage in config.toml", "garbage in model_config.json",
         "garbage in COMPLETE.json"]


def copy_checkpoints(reference_dir: Path, run_dir: Path, steps: tuple[int, ...]) -> Path:
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in steps:
        shutil.copytree(reference_dir / "checkpoints" / f"step_{step:08d}", ckpts / f"step_{step:08d}")
    return ckpts


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_falls_back_and_the_run_ends_bitwise_equal(kind, reference, corpus, tmp_path,
                                                                            caplog):
    reference_dir, reference_weights = reference
    ckpts = copy_checkpoints(reference_dir, tmp_path, (2, 4))
    bad_file = damage(kind)(ckpts / DAMAGED_STEP)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_config(tmp_path, corpus, STEPS))
        summary = trainer.train()
    warning = next(r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage())
    assert DAMAGED_STEP in warning and bad_file in warning and "\n" not in warning
    assert trainer.last_checkpoint == ckpts / "step_00000006" and summary["status"] == "finished"
    assert losses(tmp_path) == {s: v for s, v in losses(reference_dir).items() if s > 2}
    weights = trainer.model.state_dict()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)
    assert verify_checkpoint(ckpts / DAMAGED_STEP) is None  # saved again when step 4 came round


def test_preempted_run_replaces_the_damaged_step_it_saves(reference, corpus, tmp_path):
    """A signal at step 4 after falling back from a damaged step 4: the save writes step 4 again
    and summary.json names it only because it now verifies."""
    reference_dir, _ = reference
    ckpts = copy_checkpoints(reference_dir, tmp_path, (2, 4))
    garbage(distcp(ckpts / DAMAGED_STEP))
    trainer = Trainer(tiny_config(tmp_path, corpus, STEPS))
    signal_during_step(trainer, 4)
    with pytest.raises(Exception, match="signal"):
        trainer.train()
    summary = read_summary(tmp_path)
    assert summary["status"] == "preempted" and summary["checkpoint"] == str(ckpts / DAMAGED_STEP)
    assert verify_checkpoint(ckpts / DAMAGED_STEP) is None


def save_tiny(mgr: CheckpointManager, step: int, value: float) -> Path:
    return mgr.save(step, {"model": {"w": torch.full((256,), value)}}, {"rng": step}, {"step": step},
                    {"config.toml": "x = 1\n"})


def test_save_over_an_existing_directory_writes_it_again(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=3, async_save=False, is_main=True)
    path = save_tiny(mgr, 1, 1.0)
    garbage(path / "config.toml")
    assert "config.toml" in verify_checkpoint(path)
    assert save_tiny(mgr, 1, 2.0) == path and verify_checkpoint(path) is None
    target = {"model": {"w": torch.zeros(256)}}
    mgr.load(path, target)
    assert torch.equal(target["model"]["w"], torch.full((256,), 2.0))
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    assert save_tiny(mgr, 1, 3.0) == path  # an intact one too: it holds another trajectory's state
    mgr.load(path, target)
    assert torch.equal(target["model"]["w"], torch.full((256,), 3.0))


class _CreatesFile:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def crafted_pickle(size: int, sentinel: Path) -> bytes:
    payload = pickle.dumps(_CreatesFile(sentinel))
    assert len(payload) <= size
    return payload + b"\0" * (size - len(payload))  # the unpickler stops at STOP: same size, same effect


def reseal(ckpt: Path) -> None:
    """What an attacker who can also rewrite the marker would do: make the hashes match again."""
    records = read_marker(ckpt)
    write_marker(ckpt, {n: FileRecord((ckpt / n).stat().st_size, file_digest(ckpt / n)) for n in records})


def test_crafted_dcp_metadata_is_never_unpickled(reference, corpus, tmp_path):
    """DCP's .metadata is a pickle: a replaced one fails its hash before DCP reads it."""
    reference_dir, _ = reference
    ckpts = copy_checkpoints(reference_dir, tmp_path, (2, 4))
    sentinel, metadata = tmp_path / "code_ran", ckpts / DAMAGED_STEP / ".metadata"
    metadata.write_bytes(crafted_pickle(metadata.stat().st_size, sentinel))
    trainer = Trainer(tiny_config(tmp_path, corpus, 4))
    trainer.train()
    assert trainer._resumed_from == ckpts / "step_00000002" and not sentinel.exists()


def test_crafted_train_state_runs_no_code_even_with_a_matching_marker(reference, corpus, tmp_path):
    reference_dir, _ = reference
    ckpts = copy_checkpoints(reference_dir, tmp_path, (2,))
    sentinel, state = tmp_path / "code_ran", ckpts / "step_00000002" / "train_state.json"
    state.write_bytes(crafted_pickle(state.stat().st_size, sentinel))
    reseal(ckpts / "step_00000002")
    with pytest.raises(ConfigError, match="train_state.json is not a train state .*not written by pretrain/main.py"):
        Trainer(tiny_config(tmp_path, corpus, 4))  # read for the saved settings at start: one line, exit 2
    assert not sentinel.exists()


def test_load_rechecks_files_changed_after_verification(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=3, async_save=False, is_main=True)
    path = save_tiny(mgr, 1, 1.0)
    assert verify_checkpoint(path) is None
    garbage(path / ".metadata", 16)
    with pytest.raises(CheckpointDamaged, match=r"\.metadata does not match its checksum"):
        mgr.load(path, {"model": {"w": torch.zeros(256)}})


def test_resume_warns_when_the_thread_count_changed(reference, corpus, tmp_path, caplog):
    """Bitwise resume needs the same CPU thread count (reductions split by thread): say so."""
    reference_dir, _ = reference
    copy_checkpoints(reference_dir, tmp_path, (2,))
    state = json.loads((tmp_path / "checkpoints/step_00000002/train_state.json").read_text())
    saved_threads = state["runtime"]["num_threads"]
    assert saved_threads == torch.get_num_threads() and {"torch", "cuda", "python"} <= set(state["runtime"])
    trainer = Trainer(tiny_config(tmp_path, corpus, 4))
    torch.set_num_threads(saved_threads + 1)
    try:
        with caplog.at_level(logging.WARNING):
            trainer.resume()
    finally:
        torch.set_num_threads(saved_threads)
    assert f"num_threads: {saved_threads} -> {saved_threads + 1}" in caplog.text


def test_rerun_of_a_finished_run_says_so_and_trains_nothing(reference, corpus, tmp_path, caplog):
    reference_dir, reference_weights = reference
    copy_checkpoints(reference_dir, tmp_path, (6,))
    with caplog.at_level(logging.INFO):
        summary = Trainer(tiny_config(tmp_path, corpus, STEPS)).train()
    assert "already finished at step 6" in caplog.text
    assert summary["status"] == "finished" and summary["step"] == STEPS and read_summary(tmp_path)["step"] == STEPS
    assert not (tmp_path / "metrics.jsonl").exists() or not losses(tmp_path)


def test_an_unreadable_file_is_damage_not_a_crash(tmp_path, monkeypatch):
    """A bad sector (EIO) while hashing: that checkpoint is passed over like any damaged one."""
    import errno

    import pretrain.checkpoint_integrity as integrity

    mgr = CheckpointManager(tmp_path / "ck", keep=3, async_save=False, is_main=True)
    good, unreadable = save_tiny(mgr, 1, 1.0), save_tiny(mgr, 2, 2.0)
    digest = integrity.file_digest

    def failing_disk(path: Path) -> str:
        if path.parent == unreadable and path.suffix == ".distcp":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return digest(path)

    monkeypatch.setattr(integrity, "file_digest", failing_disk)
    assert "cannot read" in verify_checkpoint(unreadable) and "Input/output error" in verify_checkpoint(unreadable)
    assert find_latest_complete(tmp_path / "ck") == good


def test_pruning_keeps_what_this_run_saved_over_stale_newer_steps(tmp_path):
    """keep=1 after resuming past a damaged newer step: the step this run just saved stays; the
    stale one is not this run's state and is replaced only when this run saves that step."""
    ck = tmp_path / "ck"
    stale = save_tiny(CheckpointManager(ck, keep=1, async_save=False, is_main=True), 4, 4.0)
    garbage(stale / "config.toml")
    mgr = CheckpointManager(ck, keep=1, async_save=False, is_main=True)
    saved = save_tiny(mgr, 2, 2.0)
    assert mgr.committed == saved and verify_checkpoint(saved) is None and stale.is_dir()
    assert save_tiny(mgr, 4, 4.5) == stale and verify_checkpoint(stale) is None and not saved.exists()


def test_a_commit_interrupted_between_its_renames_is_finished(tmp_path):
    """A crash after the old directory was moved aside and before the sealed one took its name."""
    from pretrain.resume_choice import choose_resume_checkpoint

    ck = tmp_path / "ck"
    path = save_tiny(CheckpointManager(ck, keep=3, async_save=False, is_main=True), 1, 1.0)
    path.rename(ck / f".tmp-{path.name}")  # sealed, not yet renamed
    (ck / f".tmp-replaced-{path.name}-1-2").mkdir()
    (ck / ".tmp-step_00000002").mkdir()  # a save that never sealed: nothing to finish
    assert choose_resume_checkpoint(ck, "") == path and verify_checkpoint(path) is None
    CheckpointManager(ck, keep=3, async_save=False, is_main=True)  # cleans the rest
    assert sorted(p.name for p in ck.iterdir()) == [path.name]


def test_a_run_whose_checkpoints_all_fail_stops_instead_of_starting_over(tmp_path):
    """Starting from step 0 would overwrite the damaged checkpoints one by one: stop, exit 2."""
    from pretrain.resume_choice import choose_resume_checkpoint

    mgr = CheckpointManager(tmp_path / "ck", keep=3, async_save=False, is_main=True)
    for step in (1, 2):
        garbage(save_tiny(mgr, step, step) / "train_state.json")
    with pytest.raises(ConfigError, match="none of its 2 checkpoints verifies .*step_00000002"):
        choose_resume_checkpoint(tmp_path / "ck", "")


@pytest.mark.parametrize("parts", [1, 3, 4, 8])
def test_each_rank_hashes_the_shards_it_wrote_and_every_file_once(parts):
    names = [f"__{r}_0.distcp" for r in range(4)] + [".metadata", "train_state.json", "config.toml", "COMPLETE.json"]
    shares = [share(names, part, parts) for part in range(parts)]
    assert sorted(n for s in shares for n in s) == sorted(names)
    for part, mine in enumerate(shares):
        assert {n for n in mine if n.endswith(".distcp")} == {f"__{r}_0.distcp" for r in range(4) if r % parts == part}


def test_damaged_newer_checkpoints_are_set_aside_at_resume(tmp_path, monkeypatch):
    """A damaged step passed over at resume leaves the listing once the resume has loaded (kept
    under damaged-*/): it can no longer count towards checkpoint.keep, so pruning never keeps it
    over intact ones. One that merely could not be read (an I/O error, maybe transient) stays."""
    import errno

    import pretrain.checkpoint_integrity as integrity
    from pretrain.checkpoint import list_checkpoints
    from pretrain.resume_choice import choose_resume_checkpoint, set_aside_stale

    ck = tmp_path / "ck"
    mgr = CheckpointManager(ck, keep=5, async_save=False, is_main=True)
    one, two, three, four = (save_tiny(mgr, step, step) for step in (1, 2, 3, 4))
    overwrite(three / "config.toml", b"y")  # same size: only its hash tells
    digest = integrity.file_digest

    def failing_disk(path: Path) -> str:
        if path.parent == four:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return digest(path)

    monkeypatch.setattr(integrity, "file_digest", failing_disk)
    stale: dict = {}
    assert choose_resume_checkpoint(ck, "", stale) == two
    assert list_checkpoints(ck) == [one, two, three, four]  # nothing moves before the resume has loaded
    set_aside_stale(ck, stale, is_main=True)
    assert list_checkpoints(ck) == [one, two, four]
    [aside] = ck.glob("damaged-*")
    assert (aside / three.name / "config.toml").read_bytes().startswith(b"y")


def test_rewind_sets_later_steps_aside_and_the_requeued_command_continues_it(reference, corpus, tmp_path):
    """--resume-from an older step of the same run: the later steps (another trajectory) move to
    superseded-*/, the new trajectory's saves take their names, and the same command run again
    (a requeue) continues from the newest of them instead of starting over - nor does a plain
    auto-resume ever jump back to the old trajectory."""
    from pretrain.checkpoint import checkpoint_origin, list_checkpoints, origin_key

    reference_dir, _ = reference
    ck = copy_checkpoints(reference_dir, tmp_path, (2, 4, 6))
    shutil.copy(reference_dir / "metrics.jsonl", tmp_path)
    (ck / "latest").symlink_to(ck / "step_00000006")  # a link to the newest: a plain resume, nothing set aside
    Trainer(tiny_config(tmp_path, corpus, 6, f"--checkpoint.resume_from={ck / 'latest'}")).train()
    rewind = (f"--checkpoint.resume_from={ck / 'step_00000002'}", "--optim.lr=1e-3")
    with pytest.raises(ConfigError, match="train.seed"):  # a rewind that fails to load moves nothing
        Trainer(tiny_config(tmp_path, corpus, 4, *rewind, "--train.seed=7")).train()
    assert [p.name for p in list_checkpoints(ck)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list(ck.glob("superseded-*"))
    (ck / "latest").unlink()
    Trainer(tiny_config(tmp_path, corpus, 4, *rewind)).train()
    [aside] = ck.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]
    assert verify_checkpoint(aside / "step_00000006") is None
    assert [p.name for p in list_checkpoints(ck)] == ["step_00000002", "step_00000004"]
    assert checkpoint_origin(ck / "step_00000004") == origin_key(ck / "step_00000002")
    ref = losses(reference_dir)
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4] and {s: got[s] for s in (1, 2, 3)} == {s: ref[s] for s in (1, 2, 3)}
    assert len(got[4]) == 1 and got[4] != ref[4]  # step 3's update ran at 1e-3: 4's loss differs
    assert losses(tmp_path, "metrics.superseded.jsonl") == {s: ref[s] for s in (3, 4, 5, 6)}  # the old trajectory's

    requeued = Trainer(tiny_config(tmp_path, corpus, STEPS, *rewind))
    assert requeued._resume_path == ck / "step_00000004"
    requeued.train()
    assert checkpoint_origin(ck / "step_00000006") == origin_key(ck / "step_00000002")
    assert sorted(losses(tmp_path)) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in losses(tmp_path).values())
    assert Trainer(tiny_config(tmp_path, corpus, STEPS))._resume_path == ck / "step_00000006"
    assert len(list(ck.glob("superseded-*"))) == 1


def test_resume_runs_this_configs_optimizer_settings_and_schedule(reference, corpus, tmp_path, caplog):
    """The optimizer's and scheduler's state dicts bring back the checkpoint's lr, betas and weight
    decay; a resumed run trains with its own (and says what changed), and a run extended past its
    old train.steps continues at the new schedule's lr, not the old cooldown's 0."""
    from pretrain.schedule import lr_multiplier

    reference_dir, _ = reference
    copy_checkpoints(reference_dir, tmp_path, (6,))
    trainer = Trainer(tiny_config(tmp_path, corpus, 10, "--optim.weight_decay=0.5", "--optim.beta2=0.99"))
    with caplog.at_level(logging.WARNING):
        trainer.resume()
    assert "optim.weight_decay 0.1 -> 0.5" in caplog.text and "optim.beta1/beta2" in caplog.text
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.99)
    expected = 3e-3 * lr_multiplier(6, 10, trainer.cfg.schedule)
    assert expected > 0 and decay["lr"] == no_decay["lr"] == expected == trainer.scheduler.get_last_lr()[0]


def test_resuming_into_another_model_stops_before_loading_naming_the_setting(reference, corpus, tmp_path):
    """Compared with the checkpoint's model_config.json before any model is built on a device or
    any checkpoint file is read (which takes minutes at scale)."""

    reference_dir, _ = reference
    copy_checkpoints(reference_dir, tmp_path, (6,))
    with pytest.raises(ConfigError, match=r"step_00000006 was trained with other model settings \(model.overrides."
                                          r"moe.n_experts 8 -> 4\); resume with the checkpoint's"):
        Trainer(tiny_config(tmp_path, corpus, 8, "--model.overrides.moe.n_experts=4"))


def test_resuming_on_data_of_another_tokenizer_names_the_data(reference, corpus, tmp_path):
    """The vocabulary is read off the data, so no override can match the checkpoint's: the error
    says the data is not the run's (it told users to pass the checkpoint's model.overrides, which
    the data check then refused)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from data_pipeline.prepare import PrepareConfig, prepare

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x): return x " * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("def f(x): return x\n" * 400)
    prepare(PrepareConfig([str(tmp_path / "a.txt")], str(tmp_path / "tokenizer.json"), tmp_path / "bpe",
                          val_fraction=0, workers=1, progress=False))
    reference_dir, _ = reference
    copy_checkpoints(reference_dir, tmp_path / "run", (6,))
    with pytest.raises(ConfigError, match=r"step_00000006 was trained on data of a 258-id tokenizer, but data.sources "
                                          r"\[.*bpe'\] is tokenized with \d+ ids: other data than the run's; resume "
                                          r"with the data of .*config.toml, or train on this data in a new run"):
        Trainer(tiny_config(tmp_path / "run", tmp_path / "bpe", 8))


def test_resuming_with_other_model_settings_of_the_same_shapes_stops_or_warns(reference, corpus, tmp_path, caplog):
    """Another fusion (or top-k, window) keeps every tensor's shape: refused at start, naming the
    setting; a setting a resumed run may change (MAY_CHANGE_ON_RESUME) is warned and taken."""

    reference_dir, _ = reference
    copy_checkpoints(reference_dir, tmp_path, (6,))
    with pytest.raises(ConfigError, match=r"step_00000006 was trained with other model settings \(model.overrides."
                                          r"intra.fusion 'subtract' -> 'add'; model.overrides.moe.top_k 1 -> 2\); "
                                          r"resume with the checkpoint's .*--checkpoint.init_from"):
        Trainer(tiny_config(tmp_path, corpus, 8, "--model.overrides.intra.fusion=add", "--model.overrides.moe.top_k=2"))
    with caplog.at_level(logging.WARNING):
        assert Trainer(tiny_config(tmp_path, corpus, 8, "--model.overrides.rope.theta=10000")).resume()
    assert "model settings other than the checkpoint's: model.overrides.rope.theta 500000.0 -> 10000" in caplog.text


@pytest.mark.parametrize("where", ["missing", "run dir", "checkpoints dir"])
def test_resume_from_a_path_that_is_no_checkpoint_says_what_it_is(reference, tmp_path, where):
    from pretrain.resume_choice import choose_resume_checkpoint

    reference_dir, _ = reference
    path = {"missing": tmp_path / "nope", "run dir": reference_dir, "checkpoints dir": reference_dir / "checkpoints"}
    said = {"missing": "no such directory"}.get(where, "a run or checkpoints directory")
    with pytest.raises(ConfigError, match=said):
        choose_resume_checkpoint(tmp_path / "ck", str(path[where]))


def test_resuming_with_another_seed_names_the_config_key(reference, corpus, tmp_path):
    reference_dir, _ = reference
    copy_checkpoints(reference_dir, tmp_path, (6,))
    with pytest.raises(ConfigError, match=r"train\.seed is not the resumed checkpoint's \(checkpoint has 0, loader has 7\)"):
        Trainer(tiny_config(tmp_path, corpus, 8, "--train.seed=7")).resume()
