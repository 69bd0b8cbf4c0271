"""tools/gpu_check.sh cannot run without a GPU here; what can be checked without one is: bash
parses it, shellcheck finds nothing, and every Python program it feeds to the interpreter
compiles."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.sh"


def test_bash_parses_it():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_embedded_python_compiles():
    programs = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", SCRIPT.read_text(), flags=re.S)
    assert len(programs) == 4
    for program in programs:
        compile(program, "gpu_check.sh heredoc", "exec")
