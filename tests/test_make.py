"""The Makefile stops with a clear message on a Python older than 3.10, before it builds the environment."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def fake_python(folder: Path, version: tuple[int, int, int]) -> Path:
    """An executable that reports `version` to `-c` code and fails, saying so, on anything else (such as -m venv)."""
    path = folder / f"python{version[0]}.{version[1]}"
    path.write_text(f"#!{sys.executable}\n"
                    "import sys\n"
                    f"sys.version_info = {(*version, 'final', 0)!r}\n"
                    f"sys.version = '{'.'.join(map(str, version))} (fake)'\n"
                    "if sys.argv[1] == '-c':\n"
                    "    exec(sys.argv[2])\n"
                    "else:\n"
                    "    sys.exit('fake python asked to run: ' + ' '.join(sys.argv[1:]))\n")
    path.chmod(0o755)
    return path


def make_venv(tmp_path: Path, python: Path) -> subprocess.CompletedProcess:
    """`make .venv/bin/python PYTHON=python` in a copy of the Makefile and requirements.txt."""
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    return subprocess.run(["make", ".venv/bin/python", f"PYTHON={python}"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def test_make_refuses_python_3_9_before_building_the_venv(tmp_path):
    result = make_venv(tmp_path, fake_python(tmp_path, (3, 9, 18)))
    assert result.returncode != 0
    assert "Python 3.10 or newer is needed" in result.stderr and "3.9.18" in result.stderr
    assert "asked to run" not in result.stderr and not (tmp_path / ".venv").exists()


def test_make_goes_on_to_build_the_venv_with_python_3_10(tmp_path):
    result = make_venv(tmp_path, fake_python(tmp_path, (3, 10, 0)))
    assert "Python 3.10 or newer is needed" not in result.stderr
    assert "fake python asked to run: -m venv .venv" in result.stderr
