"""Config: defaults < TOML < CLI, type checks, errors that name the key, exact TOML round trips."""
import dataclasses
import random
import re
import string
import subprocess
import sys
import typing

import pytest
import torch

from pretrain.config import ConfigError, JobConfig, parse_args, parse_source, to_toml, validate
from pretrain.main import main
from pretrain.model.config import MoEConfig, RopeConfig, scalar_type
from trainer_helpers import REPO, run_to_end, tiny_args


def test_cli_overrides_toml_and_shortcuts(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('run_dir = "a"\n[optim]\nlr = 1e-3\n[train]\nsteps = 50\n[model.overrides]\nd_model = 32\n')
    cfg, args = parse_args(["--config", str(toml), "--optim.lr=3e-4", "--train.steps", "7", "--arch", "llama",
                            "--data", "d1:0.25", "--data", "d2", "--model.overrides.intra.norm=rms", "--dry-run"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.run_dir == "a"
    assert cfg.model.arch == "llama" and cfg.model.overrides == {"d_model": 32, "intra.norm": "rms"}
    assert cfg.data.sources == ["d1:0.25", "d2"] and args.dry_run


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg, _ = parse_args(["--optim.lr=3e-4", "--checkpoint.async_save=true", "--model.overrides.vocab_size=99"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    again, _ = parse_args(["--config", str(path)])
    assert again == cfg


@pytest.mark.parametrize("argv, needle", [
    (["--optim.lrr=1"], "optim.lrr"),
    (["--optim.lr=fast"], "optim.lr"),
    (["--train.steps=2.5"], "train.steps"),
    (["--checkpoint.async_save=maybe"], "checkpoint.async_save"),
    (["--schedule.kind=linear"], "schedule.kind"),
    (["--schedule.warmup_frac=0.9"], "schedule.warmup_frac"),
    (["--train.steps=0"], "train.steps"),
    (["--bogus=1"], "--bogus"),
    (["--optim=1"], "--optim"),
    (["--train=1"], "--train"),
    (["--optim.lr=nan"], "optim.lr"),
    (["--optim.lr=inf"], "optim.lr"),
    (["--optim.weight_decay=-inf"], "optim.weight_decay"),
    (["--optim.beta1=1"], "optim.beta1"),
    (["--optim.beta2=-0.1"], "optim.beta2"),
    (["--optim.eps=0"], "optim.eps"),
    (["--train.seed=-1"], "train.seed"),
    (["--train.steps=1e400"], "train.steps"),
    (["--train.steps=1.5e0"], "train.steps"),
    (["--train.seed=18446744073709551616"], "train.seed"),
    (["--logging.peak_tflops=nan"], "logging.peak_tflops"),
    (["--parallel.dp_replicate=0"], "parallel.dp_replicate = 0 must be >= 1"),
    (["--train.activation_checkpointing=true", "--train.ac_mode=selective", "--parallel.pp=2",
      "--parallel.pp_schedule=zbv"], "train.ac_mode = selective does not run with parallel.pp_schedule=zbv"),
    (["--train.compile=true", "--parallel.pp=2", "--parallel.pp_schedule=dualpipev"],
     "train.compile = true does not run with parallel.pp_schedule=dualpipev"),
    # refused by the trainer at start but passed by a one-rank dry run
    (["--train.compile=true", "--train.activation_checkpointing=true", "--train.ac_mode=selective"],
     "train.ac_mode = selective runs eagerly only"),
    (["--model.overrides.moe=false"], "model field 'moe' is a section: set its fields"),
])
def test_bad_keys_and_values_name_the_key(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_args(argv)


@pytest.mark.parametrize("bad", ["--optim.lr=nan", "--optim.beta2=1.5", "--optim.eps=-1e-8", "--train.seed=-3",
                                 "--train.steps=1e400"])
def test_bad_values_exit_2_at_start_with_one_line(bad, capsys):
    assert main([bad, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config") or err.startswith("error: command line")
    assert err.count("\n") == 1 and bad.split("=")[0][2:] in err


def test_toml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*optim\.learning_rate"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "missing.toml")])


@pytest.mark.parametrize("overrides, needle", [
    ("d_modl = 64", r"model\.overrides\.d_modl: unknown model field 'd_modl'"),
    ("[model.overrides.intra]\nnrm = 'rms'", r"model\.overrides\.intra: unknown model field 'intra\.nrm' \(intra has: "),
    ("'intra.fusin' = 'add'", r"model\.overrides\.intra\.fusin: unknown model field 'intra\.fusin'"),
    ("[model.overrides.d_model]\nx = 1", r"model\.overrides\.d_model: model field 'd_model' is not a section"),
])
def test_unknown_model_override_in_a_file_names_the_file(tmp_path, overrides, needle):
    """Checked as the file is read (before: only when the model was built, without the file's name)."""
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[model.overrides]\n{overrides}\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: " + needle):
        parse_args(["--config", str(bad)])
    cfg, _ = parse_args(["--model.overrides.intra.fusion=concat", "--model.overrides.moe.n_experts=4"])
    assert cfg.model.overrides == {"intra.fusion": "concat", "moe.n_experts": 4}  # known fields pass


@pytest.mark.parametrize("flag, value", [("tie_embeddings", "no"), ("tie_embeddings", "False"),
                                         ("intra.value_sharing", "yes"), ("rope.theta", "2e6"), ("d_model", "64"),
                                         ("max_seq_len", "2e4"), ("tie_embeddings", "1"), ("intra.value_sharing", "0"),
                                         ("rope.factor", "none"), ("moe.d_expert", "None")])
def test_model_override_strings_read_as_the_fields_type(flag, value):
    """'no' for a bool field was the string "no", which reads as true: it built a tied model. 1/0
    (TOML integers) were refused for bools, and an optional field could not be unset (TOML has no
    null): `rope.factor=none`, RoPE without scaling, is what an imported HF Llama has."""
    cfg, _ = parse_args([f"--model.overrides.{flag}={value}"])
    want = {"no": False, "False": False, "yes": True, "2e6": 2e6, "64": 64, "2e4": 20000, "1": True, "0": False,
            "none": None, "None": None}[value]
    assert cfg.model.overrides[flag] == want and type(cfg.model.overrides[flag]) is type(want)


def test_an_unset_override_round_trips_and_builds(tmp_path):
    from pretrain.job import build_model_from_config

    cfg, _ = parse_args(["--arch", "llama", "--size", "tiny", "--model.overrides.rope.factor=none"])
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    again, _ = parse_args(["--config", str(tmp_path / "c.toml")])
    assert again == cfg and build_model_from_config(again, device="meta").config.rope.factor is None


@pytest.mark.parametrize("flag, says", [
    ("rope.theta=abc", r"model\.overrides\.rope\.theta='abc' is not a valid float"),
    ("moe.bias_update_rate=abc", r"model\.overrides\.moe\.bias_update_rate='abc' is not a valid float"),
    ("rope={theta='abc'}", r"model\.overrides\.rope\.theta='abc' is not a valid float"),  # a table: per field
])
def test_model_override_of_the_wrong_type_is_refused_on_the_command_line(flag, says):
    with pytest.raises(ConfigError, match=says):
        parse_args([f"--model.overrides.{flag}"])


@pytest.mark.parametrize("override, says", [
    ("a_init_range=[1]", "a_init_range is (1,), not tuple"),
    ("intra={fusion=1}", "intra.fusion is 1, not str"),
    ("rope.theta=-1", "rope.theta' is invalid: must be a number > 0"),
    ("rope.factor=0", "rope.factor' is invalid: must be a number > 0 (got 0)"),
    ("moe.n_shared=-1", "moe.n_shared' is invalid: must be >= 0"),
    ("moe.aux_loss_coef=-1", "moe.aux_loss_coef' is invalid: must be >= 0"),
    ("dt_min=0.5", "dt_min' is invalid: must be <= dt_max"),
    ("d_ffn=1e20", "d_ffn' is invalid: must be an integer in [1, 2**31)"),  # was a C++ stack dump
])
def test_model_override_values_are_checked_before_the_model_builds(override, says):
    """Each ran (NaN losses, a traceback at the first step, an IndexError in the dry run)."""
    from pretrain.job import build_model_from_config

    cfg, _ = parse_args(["--arch", "hybrid_moe", "--size", "tiny", f"--model.overrides.{override}"])
    with pytest.raises(ConfigError, match=re.escape(says)):
        build_model_from_config(cfg, device="meta")


@pytest.mark.parametrize("order", [0, 1])
def test_a_table_and_a_dotted_override_of_one_section_both_apply(order, tmp_path):
    from pretrain.job import build_model_from_config

    flags = ["--model.overrides.moe.top_k=3", "--model.overrides.moe={n_experts=4}"]
    cfg, _ = parse_args(["--arch", "hybrid_moe", "--size", "tiny", *(flags if order else flags[::-1])])
    moe = build_model_from_config(cfg, device="meta").config.moe
    assert (moe.n_experts, moe.top_k) == (4, 3)
    # a file's table, then the same field on the command line: the command line's, also once the
    # resolved config.toml (which writes keys in its own order) is read back
    (tmp_path / "a.toml").write_text("[model.overrides.moe]\nn_experts = 4\n")
    cfg, _ = parse_args(["--arch", "hybrid_moe", "--size", "tiny", "--config", str(tmp_path / "a.toml"),
                         "--model.overrides.moe.n_experts=8"])
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    again, _ = parse_args(["--config", str(tmp_path / "resolved.toml")])
    for c in (cfg, again):
        assert build_model_from_config(c, device="meta").config.moe.n_experts == 8


@pytest.mark.parametrize("text, says", [("[optim]\nlr = [1, 2]\n", "optim.lr=[1, 2] is not a valid float"),
                                        ("[train]\nsteps = 1979-05-27\n", "train.steps=datetime.date"),
                                        ("[data]\nsources = 5\n", "data.sources=5 is not a valid list")])
def test_toml_values_of_the_wrong_kind_are_one_line(tmp_path, text, says):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=says.replace(".", r"\.").replace("[", r"\[")):
        parse_args(["--config", str(tmp_path / "c.toml")])
    (tmp_path / "c.toml").write_bytes(b"[optim]\nlr = 1e-3 # \xff\n")
    with pytest.raises(ConfigError, match=r"c\.toml: not UTF-8 \(byte 20"):
        parse_args(["--config", str(tmp_path / "c.toml")])


def test_config_files_layer_and_a_shortcut_with_its_own_key_is_refused(tmp_path):
    (tmp_path / "a.toml").write_text("[train]\nsteps = 77\nseed = 1\n")
    (tmp_path / "b.toml").write_text("[train]\nseed = 2\n")
    cfg, _ = parse_args(["--config", str(tmp_path / "a.toml"), "--config", str(tmp_path / "b.toml")])
    assert (cfg.train.steps, cfg.train.seed) == (77, 2)  # the second file lost its first's steps
    with pytest.raises(ConfigError, match="--arch and --model.arch both set model.arch; keep one"):
        parse_args(["--model.arch=mamba2", "--arch", "llama"])
    with pytest.raises(ConfigError, match="--data and --data.sources both set data.sources"):
        parse_args(["--data.sources=/y", "--data", "/x"])


def test_validation_on_nothing_and_a_guard_that_stops_at_once_are_refused():
    with pytest.raises(ConfigError, match="train.val_batches = 0 validates on nothing every 100 steps"):
        parse_args(["--train.val_every=100", "--train.val_batches=0"])
    parse_args(["--train.val_every=0", "--train.val_batches=0"])  # validation off: fine
    with pytest.raises(ConfigError, match="train.max_bad_steps = 0 must be > 0"):
        parse_args(["--train.max_bad_steps=0"])


def test_sources_with_weights():
    assert parse_source("/data/a:0.3") == ("/data/a", 0.3)
    assert parse_source("/data/a") == ("/data/a", 1.0)
    assert parse_source("relative/dir") == ("relative/dir", 1.0)
    for bad in ("0", "inf", "nan", "1e400", "-1"):
        with pytest.raises(ConfigError, match="weights must be finite and > 0"):
            parse_source(f"/data/a:{bad}")


def test_defaults_validate():
    from pretrain.config import validate
    validate(JobConfig())


def random_value(tp, rng: random.Random):
    """A value of type `tp` with the awkward cases TOML writers get wrong: quotes, backslashes,
    newlines, unicode, tiny and huge floats, nested tables."""
    if tp is bool:
        return rng.random() < 0.5
    if tp is int:
        return rng.choice([0, 1, -1, 2**40, rng.randrange(-10**6, 10**6)])
    if tp is float:
        return rng.choice([0.0, -0.0, 1e-300, 1.7976931348623157e308, rng.uniform(-1e3, 1e3), 1 / 3])
    if tp is str:
        alphabet = string.printable + "éü→🙂\"\\'"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
    if typing.get_origin(tp) is list:
        return [random_value(str, rng) for _ in range(rng.randrange(0, 3))]
    if typing.get_origin(tp) is dict:  # model.overrides: dotted keys, tables of a section's fields, lists
        table = {}
        for _ in range(rng.randrange(0, 4)):
            key = rng.choice(["d_model", "intra.fusion", "intra.value_sharing", "a_init_range", "moe", "rope"])
            if key in ("moe", "rope"):  # a section's fields, as the dotted keys a table is read into
                names = [f.name for f in dataclasses.fields(MoEConfig if key == "moe" else RopeConfig)]
                for name in (f"{key}.{rng.choice(names)}" for _ in range(rng.randrange(1, 3))):
                    table[name] = random_value(scalar_type(name), rng)
                if key == "moe" and rng.random() < 0.3:
                    table["moe"] = {}  # an empty table stays one (it turns the MoE on)
            elif key == "a_init_range":
                table[key] = [random_value(float, rng) for _ in range(2)]
            else:  # a string for a number or bool field is read as that type: generate the field's own
                table[key] = random_value({"d_model": int, "intra.fusion": str, "intra.value_sharing": bool}[key], rng)
        return table
    raise TypeError(f"no generator for {tp}")


def random_config(rng: random.Random) -> JobConfig:
    def fill(obj):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if dataclasses.is_dataclass(hints[f.name]):
                fill(getattr(obj, f.name))
            elif rng.random() < 0.7:
                setattr(obj, f.name, random_value(hints[f.name], rng))
        return obj
    return fill(JobConfig())


def test_any_config_round_trips_through_its_toml_exactly(tmp_path):
    """Property test over 300 generated configs (values need not validate: the writer must not care)."""
    rng = random.Random(8)
    path = tmp_path / "c.toml"
    for i in range(300):
        cfg = random_config(rng)
        path.write_text(to_toml(cfg))
        from pretrain.config import apply_toml
        again = JobConfig()
        apply_toml(again, path)
        assert again == cfg, (i, to_toml(cfg))


def test_nested_model_overrides_survive_a_resumed_run(tmp_path):
    """The checkpoint's config.toml with a nested override reads back (it was written as Python
    repr); a table is read as its dotted keys, which TOML writes back in any order to one model."""
    cfg, _ = parse_args(["--model.overrides.intra.fusion=concat", "--arch", "intra_hybrid",
                         "--model.overrides.moe={n_experts=4, top_k=1}"])
    assert cfg.model.overrides == {"intra.fusion": "concat", "moe.n_experts": 4, "moe.top_k": 1}
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again, _ = parse_args(["--config", str(path)])
    assert again == cfg
    validate(again)
    (tmp_path / "tables.toml").write_text("[model.overrides.moe]\nn_experts = 4\ntop_k = 1\n")  # an older file
    older, _ = parse_args(["--config", str(tmp_path / "tables.toml")])
    assert older.model.overrides == {"moe.n_experts": 4, "moe.top_k": 1}


def test_help_lists_every_arch_and_size():
    from pretrain.model.presets import ARCHS, SIZES

    out = subprocess.run([sys.executable, "pretrain/main.py", "--help"], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    flat = " ".join(out.split())
    assert all(a in flat for a in ARCHS) and all(s in flat for s in SIZES)


def test_model_ratio_and_placement_keys_build_the_sweep_layout():
    """A sweep sets two keys, never a hand-written pattern; the layout lands in the model config."""
    from pretrain.job import build_model_from_config

    cfg, _ = parse_args(["--arch", "inter_hybrid", "--size", "1b", "--model.ratio=1:1"])
    assert build_model_from_config(cfg, device="meta").config.pattern == "MA" * 7
    cfg, _ = parse_args(["--arch", "inter_hybrid", "--size", "1b", "--model.ratio=1:5", "--model.placement=front"])
    assert build_model_from_config(cfg, device="meta").config.pattern == "AMMMMMMAMMMMM"
    cfg, _ = parse_args(["--arch", "inter_hybrid", "--model.placement=cluster"])
    with pytest.raises(ConfigError, match="placement 'cluster'"):
        build_model_from_config(cfg, device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_exits_2_before_anything_starts(corpus, tmp_path):
    out = run_to_end(tiny_args(tmp_path / "run", corpus, 2, "--train.device=cuda"), expect_rc=2)
    assert "train.device = 'cuda' but no CUDA device is available" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


def test_a_config_error_is_recorded_for_the_launchers_but_never_over_a_finished_run(corpus, tmp_path, monkeypatch):
    """torchrun reports every failed worker as 1: the launchers (which set LAUNCH_READS_SUMMARY=1)
    read summary.json's exit code to fail the job (Kubernetes podFailurePolicy on 2) rather than
    retry it. Not at a prompt, not for a dry run, and never over a finished run's summary."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    bad = ["--run-dir", str(run), "--train.no_such_key=1"]
    assert main(bad) == 2 and not (run / "summary.json").exists()  # no launcher
    monkeypatch.setenv("LAUNCH_READS_SUMMARY", "1")
    assert main([*bad, "--dry-run"]) == 2 and not (run / "summary.json").exists()
    assert main([f"--run-dir={run}", "--train.no_such_key=1"]) == 2  # before the config parses
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "config_error" and summary["exit_code"] == 2 and "no_such_key" in summary["error"]
    out = run_to_end(tiny_args(run, corpus, 2, "--train.device=cuda"), expect_rc=2)  # after it parses
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "config_error" and summary["exit_code"] == 2 and summary["arch"] == "hybrid_moe", out
    assert "no CUDA device is available" in summary["error"]
    finished = '{"status": "finished", "step": 2, "last_val_nll": 3.2}'
    (run / "summary.json").write_text(finished)
    assert main(bad) == 2 and (run / "summary.json").read_text() == finished


def test_settings_that_do_nothing_are_named():
    from pretrain.config import unused_settings

    cfg, _ = parse_args(["--parallel.pp_schedule=zbv", "--train.ac_mode=selective"])
    assert unused_settings(cfg) == ["parallel.pp_schedule='zbv' does nothing with parallel.pp=1",
                                    "train.ac_mode='selective' does nothing without train.activation_checkpointing=true"]
    cfg, _ = parse_args(["--parallel.pp=2", "--parallel.pp_schedule=zbv", "--train.activation_checkpointing=true",
                         "--train.ac_mode=full"])
    assert unused_settings(cfg) == [] and unused_settings(JobConfig()) == []
    cfg, _ = parse_args(["--schedule.kind=cosine", "--schedule.warmup_frac=0.9", "--schedule.cooldown_frac=0.5"])
    assert unused_settings(cfg) == ["schedule.cooldown_frac=0.5 does nothing with schedule.kind='cosine' (it shapes "
                                    "trapezoid and wsd)"]  # and no "sum to <= 1" refusal: cosine has no cooldown
    cfg, _ = parse_args(["--schedule.kind=constant", "--schedule.min_lr_ratio=0.1"])
    assert unused_settings(cfg) == ["schedule.min_lr_ratio=0.1 does nothing with schedule.kind='constant'"]
    # an ablation's setting for blocks the model does not have: it ran as if the fusion were built
    cfg, _ = parse_args(["--model.overrides.intra.fusion=concat", "--model.overrides.window=9",
                         "--model.overrides.rope.theta=1e4"])
    assert unused_settings(cfg, ("A", "A")) == [
        "model.overrides.intra.fusion does nothing without intra-hybrid blocks (this model's: A)",
        "model.overrides.window does nothing without sliding-window blocks (this model's: A)"]
    assert unused_settings(cfg, ("M", "H", "S")) == []


def test_equal_ratios_build_one_model():
    """'2:10' or ' 1:5' (a TOML string with a space) missed the published 3B depth: 21 blocks, not 22."""
    from pretrain.model.presets import model_config

    patterns = {r: model_config("hybrid_moe", "3b", ratio=r).pattern for r in (" 1:5", "2:10", "1:5")}
    assert set(patterns.values()) == {"MMMMHMMMHMMMMHMMMHMMMM"}, patterns


def test_dry_run_refuses_fp8_on_the_cpu_and_counts_a_small_loss_chunk(corpus, capsys):
    """A one-rank dry run passed what the trainer then refused; its loss memory was the full chunk
    budget (~1.25 GiB) whatever the batch."""
    assert main(["--arch", "llama", "--size", "tiny", "--dry-run", "--train.device=cpu", "--train.fp8=tensorwise"]) == 2
    assert "train.fp8 = 'tensorwise' needs a CUDA GPU" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs" / "cpu_smoke.toml"), "--data", str(corpus), "--dry-run"]) == 0
    loss_gib = float(re.search(r"\+ loss ([\d.]+)\) at world size 1", capsys.readouterr().out)[1])
    assert loss_gib <= 0.1  # 8 x 128 rows of a 258-id vocabulary: a few MiB, not the 1.25 GiB chunk budget


def test_data_that_cannot_be_read_stops_the_run_before_the_model_builds(corpus, tmp_path, monkeypatch):
    """A prepared dir whose shards were not copied (its manifest alone): one line, exit 2, at start
    (it was a traceback and exit 1 once the model, its weights and the optimizer had been built)."""
    import shutil

    import pretrain.trainer as trainer_module
    from pretrain.trainer import Trainer
    from trainer_helpers import tiny_config

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(corpus / "manifest.json", bare)
    built = []
    monkeypatch.setattr(trainer_module, "build_model_from_config", lambda *a, **k: built.append(a))
    with pytest.raises(ConfigError, match=r"config: data\.sources: .*bare: shards: none of the \d+ train shards"):
        Trainer(tiny_config(tmp_path / "run", bare, 2))
    assert not built
