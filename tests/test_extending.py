"""docs/extending.md stays true: its file blocks (an attack, a mode, a model, a data set, their
tests, and the from-Python example) are written into a scratch copy of the repository, registered
as the page says, and run there."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
BLOCK = re.compile(r"```(?:python|yaml)\n# file: (\S+)\n(.*?)```", re.S)
# the one line per extension that the page says to add to the package's __init__
REGISTRATIONS = {
    "utils/attacks/topleft.py": ("utils/attacks/__init__.py", "from utils.attacks import topleft  # noqa: F401,E402\n"),
    "utils/defenses/lp_init.py": ("utils/defenses/__init__.py", "from utils.defenses import lp_init  # noqa: F401,E402\n"),
    "models/tinynet.py": ("models/__init__.py", "from models import tinynet  # noqa: F401,E402\n"),
    "utils/data/mnist.py": ("utils/data/__init__.py", "from utils.data import mnist  # noqa: F401,E402\n"),
}


def _blocks() -> dict[str, str]:
    return {path: body for path, body in BLOCK.findall(DOC.read_text())}


def test_the_page_has_every_example():
    blocks = _blocks()
    for path in [*REGISTRATIONS, "attack/topleft.py", "config/attack/topleft/default.yaml", "tests/test_topleft.py",
                 "tests/test_lp_init.py", "tests/test_tinynet.py", "tests/test_mnist.py", "examples/pipeline.py"]:
        assert path in blocks, f"docs/extending.md lost its {path} example"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A copy of the repository's code with the page's files added and registered."""
    dst = tmp_path_factory.mktemp("extended")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("utils", "models", "attack", "fine_tune", "config"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    (dst / "tests").mkdir()
    for name in ("conftest.py", "test_architecture.py", "test_models.py", "test_triggers.py"):
        shutil.copy(ROOT / "tests" / name, dst / "tests" / name)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for path, body in _blocks().items():
        target = dst / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    for _, (init, line) in REGISTRATIONS.items():
        with open(dst / init, "a") as fh:
            fh.write(line)
    return dst


def _run(args: list[str], cwd: Path, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_extensions_pass_their_own_and_the_generic_tests(scratch):
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_topleft.py",
                "tests/test_lp_init.py", "tests/test_tinynet.py", "tests/test_mnist.py", "tests/test_architecture.py",
                "tests/test_models.py", "tests/test_triggers.py", "-k",
                "topleft or lp_init or tinynet or mnist or architecture or cycle or layer or top or record_file"],
               scratch)
    assert " passed" in out and "failed" not in out
    # the generic model and trigger tests did pick the new entries up
    listed = _run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                   "tests/test_models.py", "tests/test_triggers.py"], scratch)
    assert "tinynet" in listed and "topleft" in listed


def test_new_attack_runs_from_its_entry_script_and_new_mode_from_ft(scratch, tiny_fmnist, tmp_path):
    common = ["--dataset", "fmnist", "--model", "tinynet", "--record_root", str(tmp_path), "--device", "cpu",
              "--progress", "false"]
    _run([sys.executable, "attack/topleft.py", "--yaml_path", "../config/attack/prototype/fmnist.yaml",
          "--dataset_path", str(tiny_fmnist), "--epochs", "1", *common], scratch)
    out = _run([sys.executable, "fine_tune/ft.py", "--attack", "topleft", "--pratio", "0.1", "--ft_mode", "lp-init",
                "--epochs", "1", "--dataset_path", str(tiny_fmnist), *common], scratch)
    assert "lp-init" in out and (tmp_path / "fmnist" / "topleft" / "pratio_0.1-target_0-archi_tinynet" / "defense"
                                 / "lp-init" / "result.json").is_file()


def test_python_example_runs(scratch, tiny_fmnist, tmp_path):
    example = scratch / "examples" / "pipeline.py"
    text = example.read_text()
    assert 'DATA, RECORDS = "data", "record/example"' in text
    example.write_text(text.replace('DATA, RECORDS = "data", "record/example"',
                                    f'DATA, RECORDS = {str(tiny_fmnist)!r}, {str(tmp_path)!r}'))
    out = _run([sys.executable, "examples/pipeline.py"], scratch)
    assert re.search(r"before: ASR \d\.\d{3}; after FST: C-Acc \d\.\d{3}, ASR \d\.\d{3}", out)
