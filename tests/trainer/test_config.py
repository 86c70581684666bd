"""Config: defaults < TOML < CLI, type checks, and errors that name the key."""
import pytest

from pretrain.config import ConfigError, JobConfig, parse_args, parse_source, to_toml


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
])
def test_bad_keys_and_values_name_the_key(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_args(argv)


def test_toml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*optim\.learning_rate"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "missing.toml")])


def test_sources_with_weights():
    assert parse_source("/data/a:0.3") == ("/data/a", 0.3)
    assert parse_source("/data/a") == ("/data/a", 1.0)
    assert parse_source("relative/dir") == ("relative/dir", 1.0)
    with pytest.raises(ConfigError, match="weight"):
        parse_source("/data/a:0")


def test_defaults_validate():
    from pretrain.config import validate
    validate(JobConfig())
