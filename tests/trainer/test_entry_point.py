"""`python pretrain/main.py` puts pretrain/ first on sys.path: no module there may shadow the
standard library (pretrain/inspect.py once broke `import dataclasses`, and main.py rewrote sys.path)."""
import sys

from trainer_helpers import MAIN


def test_no_module_beside_the_entry_point_shadows_the_standard_library():
    beside = {p.stem for p in MAIN.parent.glob("*.py")} | {p.name for p in MAIN.parent.iterdir() if p.is_dir()}
    assert not beside & set(sys.stdlib_module_names), beside & set(sys.stdlib_module_names)


def test_entry_point_does_not_rewrite_sys_path():
    assert "sys.path" not in MAIN.read_text()
