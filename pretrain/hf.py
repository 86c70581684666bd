"""Convert checkpoints to and from Hugging Face `transformers` format.

    python -m pretrain.hf export --checkpoint RUN/checkpoints/step_00001000 --out HF_DIR
    python -m pretrain.hf import --hf HF_DIR --out DIR

The export is safetensors + config.json that `AutoModelForCausalLM.from_pretrained(HF_DIR)` loads
offline. The import writes a weights-only checkpoint: start a run from it with
`--checkpoint.init_from=DIR` (fresh optimizer and schedule). The architecture mapping itself
lives in the model zoo (`pretrain.model.hf`); this module only moves files.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pretrain.checkpoint import MODEL_CONFIG_FILE, commit, load_model_weights, model_config_json, save_model_weights


def load_model(checkpoint: Path):
    """Our model with the weights of `checkpoint` (any number of ranks wrote it)."""
    from pretrain.model import ModelConfig
    from pretrain.model.lm import HybridLM

    cfg_file = checkpoint / MODEL_CONFIG_FILE
    if not cfg_file.is_file():
        raise SystemExit(f"{cfg_file}: missing; --checkpoint must be a step_* directory written by pretrain")
    model = HybridLM(ModelConfig.from_dict(json.loads(cfg_file.read_text())))
    state = model.state_dict()
    try:
        load_model_weights(checkpoint, state)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model.load_state_dict(state)
    return model


def export(checkpoint: Path, out: Path) -> Path:
    from pretrain.model.hf import to_hf

    hf_model = to_hf(load_model(checkpoint).eval())
    hf_model.save_pretrained(out, safe_serialization=True)
    return out


def import_(hf_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from pretrain.model.hf import from_hf

    model = from_hf(AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True))
    if out.exists():
        raise SystemExit(f"{out}: already exists; choose a new --out directory")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_weights(tmp, model.state_dict())
    (tmp / MODEL_CONFIG_FILE).write_text(model_config_json(model.config))
    commit(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.hf", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="checkpoint -> Hugging Face directory")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    i = sub.add_parser("import", help="Hugging Face directory -> weights-only checkpoint")
    i.add_argument("--hf", type=Path, required=True)
    i.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "export":
        print(f"exported to {export(args.checkpoint, args.out)}")
    else:
        out = import_(args.hf, args.out)
        print(f"imported to {out}; train from it with --checkpoint.init_from={out} "
              f"(model settings must match {out / MODEL_CONFIG_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
