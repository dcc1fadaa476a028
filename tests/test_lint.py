"""The code base passes ruff's lint and is formatted by ruff format (both configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (make setup installs it)")
    out = subprocess.run([ruff, "check", "src", "tests", "bench", "launch"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_formatted():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (make setup installs it)")
    out = subprocess.run(
        [ruff, "format", "--check", "src", "tests", "bench", "launch"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, "run `ruff format src tests bench launch`:\n" + out.stdout[-4000:] + out.stderr[-2000:]
