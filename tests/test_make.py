"""The Makefile stops with a clear message on a Python older than 3.10, before it builds the environment."""
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def test_make_refuses_python_3_9_before_building_the_venv_and_goes_on_with_python_3_10(tmp_path):
    """`make .venv/bin/python` in a copy of the Makefile, with fake Pythons that report their version to `-c` code
    and fail, saying so, on anything else (such as -m venv)."""
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    results = {}
    for version in ((3, 9, 18), (3, 10, 0)):
        python = tmp_path / f"python{version[0]}.{version[1]}"
        python.write_text(f"#!{sys.executable}\n"
                          "import sys\n"
                          f"sys.version_info = {(*version, 'final', 0)!r}\n"
                          f"sys.version = '{'.'.join(map(str, version))} (fake)'\n"
                          "if sys.argv[1] == '-c':\n"
                          "    exec(sys.argv[2])\n"
                          "else:\n"
                          "    sys.exit('fake python asked to run: ' + ' '.join(sys.argv[1:]))\n")
        python.chmod(0o755)
        results[version[:2]] = subprocess.run(["make", ".venv/bin/python", f"PYTHON={python}"], cwd=tmp_path,
                                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    old, new = results[3, 9], results[3, 10]
    assert old.returncode != 0
    assert "Python 3.10 or newer is needed" in old.stderr and "3.9.18" in old.stderr
    assert "asked to run" not in old.stderr and not (tmp_path / ".venv").exists()
    assert "Python 3.10 or newer is needed" not in new.stderr
    assert "fake python asked to run: -m venv .venv" in new.stderr
