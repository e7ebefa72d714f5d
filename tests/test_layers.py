"""The layers contract (pyproject.toml, import-linter) holds for the package, and it is a real
check: a copy of the package with one import pointing up, or with an import cycle, fails it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy shadows the installed package
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "domainlm", tmp_path / "domainlm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_its_layers_and_has_no_cycles():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        # The bottom layer reaching up to the command line.
        ("files.py", "import domainlm.cli", "Layers point one way"),
        # The decoder importing a stage that is built on it.
        ("model/llama.py", "from domainlm.train import optim", "Layers point one way"),
        # Two modules of one package importing each other.
        ("model/peft/lora.py", "import domainlm.model.peft.methods", "No import cycles"),
    ],
)
@pytest.mark.slow
def test_an_import_against_the_layers_fails_the_check(tmp_path, module, line, broken):
    root = copy_package(tmp_path)
    path = root / "domainlm" / module
    text = path.read_text()
    # After the module's docstring and `from __future__`, where an import may stand.
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "  # noqa\n" + rest)
    done = lint(root)
    assert done.returncode != 0
    assert broken in done.stdout and "BROKEN" in done.stdout.upper()
