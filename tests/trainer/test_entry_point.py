"""`python pretrain/main.py` puts pretrain/ first on sys.path: no module there may shadow the
standard library (pretrain/inspect.py once broke `import dataclasses`, and main.py rewrote sys.path)."""
import subprocess
import sys

from trainer_helpers import MAIN


def test_no_module_beside_the_entry_point_shadows_the_standard_library():
    beside = {p.stem for p in MAIN.parent.glob("*.py")} | {p.name for p in MAIN.parent.iterdir() if p.is_dir()}
    assert not beside & set(sys.stdlib_module_names), beside & set(sys.stdlib_module_names)


def test_entry_point_does_not_rewrite_sys_path():
    assert "sys.path" not in MAIN.read_text()


def test_make_announces_every_slow_set_up_step(tmp_path):
    """`make demo` / `make test` spend minutes creating the environment: no silent minutes."""
    recipe = subprocess.run(["make", "-n", "-B", "venv", f"VENV={tmp_path / 'venv'}"], cwd=MAIN.parents[1],
                            capture_output=True, text=True, check=True).stdout.replace("\\\n", " ").splitlines()
    slow = [i for i, line in enumerate(recipe) if "pip install" in line or "-m venv" in line]
    assert len(slow) >= 4
    for i in slow:
        assert any('echo "==>' in line for line in recipe[max(i - 1, 0):i + 1]), recipe[i]
