"""Our Triton kernels (Mamba2's conv, gated norm and decode step, the decode attention and cache write,
the loss, the AdamW step) run by Triton's CPU interpreter
against their PyTorch references, so CI checks them without a GPU (tests/gpu runs them compiled,
at full size and in bf16, on the H200; the interpreter's bf16 `tl.dot` multiplies the raw bit
patterns, so the checks that reach one run in fp32). Each check runs in a fresh process: whether a kernel is interpreted is
fixed when it is defined, once per process, and the setting must not reach the other tests."""
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the dev extra installs it on Linux)")

ROOT = Path(__file__).resolve().parents[2]


def release(package: str) -> tuple[int, int]:
    """(major, minor) of an installed package (triton as it reports itself: pytorch-triton's wheel
    installs the module under another distribution name)."""
    text = __import__("triton").__version__ if package == "triton" else version(package)
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


# Triton 3.6's interpreter (torch 2.11's) turns a loop bound that is a kernel argument into an int
# by int(array of 1), which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"; 3.7
# squeezes first). The kernels that loop so cannot be interpreted there: pip install 'numpy<2.4'.
LOOP_BOUND_CLASH = pytest.mark.skipif(release("triton") < (3, 7) and release("numpy") >= (2, 4),
                                      reason="Triton < 3.7's interpreter fails with NumPy >= 2.4 on loops bounded by "
                                             "an argument; pip install 'numpy<2.4' to run this check")


@pytest.mark.parametrize("kernel", [pytest.param("conv", marks=LOOP_BOUND_CLASH),
                                    pytest.param("gated_norm", marks=LOOP_BOUND_CLASH),
                                    "softmax_xent", "adamw",
                                    pytest.param("decode_attention", marks=LOOP_BOUND_CLASH),
                                    "kv_write", "mamba2_step"])
def test_triton_kernel_matches_reference_in_interpreter(kernel):
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(ROOT / "tests/kernels/interpreted_checks.py"), kernel], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-4000:]
