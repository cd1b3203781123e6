"""The code follows the project's ruff configuration (pyproject.toml: line length, import order, pyflakes)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "recipes", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
