"""The code is what ``ruff`` says it should be: lint clean (including the complexity limit in
pyproject.toml) and formatted, with no formatter opt-outs."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    main = pytest.importorskip("ruff.__main__", reason="ruff comes with the dev extra: pip install -e '.[dev]'")
    return subprocess.run([main.find_ruff_bin(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_code_is_formatted_and_opts_out_nowhere():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout[-3000:]
    markers = [
        str(p.relative_to(ROOT))
        for d in ("ccpurify", "exporters", "benchmarks", "tests")
        for p in (ROOT / d).rglob("*.py")
        if "fmt: " + "skip" in p.read_text() or "fmt: " + "off" in p.read_text()
    ]
    assert not markers
