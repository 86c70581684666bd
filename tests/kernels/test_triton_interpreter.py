"""Our Triton kernels (Mamba2's conv, gated norm and decode step, the decode attention and cache write,
the loss, the AdamW step) run by Triton's CPU interpreter
against their PyTorch references, so CI checks them without a GPU (tests/gpu runs them compiled,
at full size and in bf16, on the H200; the interpreter's bf16 `tl.dot` multiplies the raw bit
patterns, so the checks that reach one run in fp32). Each check runs in a fresh process: whether a kernel is interpreted is
fixed when it is defined, once per process, and the setting must not reach the other tests."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the dev extra installs it on Linux)")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kernel", ["conv", "gated_norm", "softmax_xent", "adamw", "decode_attention", "kv_write",
                                    "mamba2_step"])
def test_triton_kernel_matches_reference_in_interpreter(kernel):
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(ROOT / "tests/kernels/interpreted_checks.py"), kernel], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-4000:]
