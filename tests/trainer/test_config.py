"""Config: defaults < TOML < CLI, type checks, errors that name the key, exact TOML round trips."""
import dataclasses
import random
import string
import subprocess
import sys
import typing

import pytest
import torch

from pretrain.config import ConfigError, JobConfig, parse_args, parse_source, to_toml, validate
from pretrain.main import main
from pretrain.model.config import MoEConfig, RopeConfig
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


def test_sources_with_weights():
    assert parse_source("/data/a:0.3") == ("/data/a", 0.3)
    assert parse_source("/data/a") == ("/data/a", 1.0)
    assert parse_source("relative/dir") == ("relative/dir", 1.0)
    with pytest.raises(ConfigError, match="weight"):
        parse_source("/data/a:0")


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
            key = rng.choice(["d_model", "intra.fusion", "moe", "rope"])
            if key in ("moe", "rope"):
                names = [f.name for f in dataclasses.fields(MoEConfig if key == "moe" else RopeConfig)]
                table[key] = {rng.choice(names): random_value(rng.choice([int, float, str]), rng)
                              for _ in range(rng.randrange(1, 3))}
            else:
                kind = rng.choice([int, float, str, bool, list])
                table[key] = [rng.randrange(9) for _ in range(3)] if kind is list else random_value(kind, rng)
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
    """The checkpoint's config.toml with a nested override reads back (it was written as Python repr)."""
    cfg, _ = parse_args(["--model.overrides.intra.fusion=concat", "--arch", "intra_hybrid"])
    cfg.model.overrides["moe"] = {"n_experts": 4, "top_k": 1}
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again, _ = parse_args(["--config", str(path)])
    assert again == cfg and again.model.overrides["moe"] == {"n_experts": 4, "top_k": 1}
    validate(again)


def test_help_lists_every_arch_and_size():
    from pretrain.model.presets import ARCHS, SIZES

    out = subprocess.run([sys.executable, "pretrain/main.py", "--help"], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    flat = " ".join(out.split())
    assert all(a in flat for a in ARCHS) and all(s in flat for s in SIZES)


def test_model_ratio_and_placement_keys_build_the_sweep_layout():
    """A sweep sets two keys, never a hand-written pattern; the layout lands in the model config."""
    from pretrain.trainer import build_model_from_config

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


def test_settings_that_do_nothing_are_named():
    from pretrain.config import unused_settings

    cfg, _ = parse_args(["--parallel.pp_schedule=zbv", "--train.ac_mode=selective"])
    assert unused_settings(cfg) == ["parallel.pp_schedule='zbv' does nothing with parallel.pp=1",
                                    "train.ac_mode='selective' does nothing without train.activation_checkpointing=true"]
    cfg, _ = parse_args(["--parallel.pp=2", "--parallel.pp_schedule=zbv", "--train.activation_checkpointing=true",
                         "--train.ac_mode=full"])
    assert unused_settings(cfg) == [] and unused_settings(JobConfig()) == []
