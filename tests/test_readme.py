"""The README's examples run, and CI runs exactly the README's test command."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_python_api_examples_run(tmp_path):
    """Each block runs as a module of its own, as a user's script in their package would (a class
    it defines can then be re-imported by ``load_model``), in an empty working folder."""
    import subprocess
    import sys

    first, *others = code_blocks("python")
    assert len(first.strip().splitlines()) <= 12  # the first screen's example stays short
    for i, block in enumerate([first, *others]):
        (tmp_path / f"readme_example_{i}.py").write_text(block)
        run = subprocess.run(
            [sys.executable, "-c", f"import readme_example_{i}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
        )
        assert run.returncode == 0, f"README python block {i}:\n{run.stderr[-2000:]}"
    assert (tmp_path / "gray.onnx").exists() and (tmp_path / "gray.safetensors").exists()


def test_ci_runs_the_readme_test_command():
    commands = [
        line.strip()
        for block in code_blocks("bash")
        for line in block.splitlines()
        if line.startswith("python3 -m venv")
    ]
    assert len(commands) == 2, "the README names exactly two set-up commands"
    demo, tests = commands
    assert demo.endswith("ccpurify demo") and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_every_document_the_code_cites_is_in_the_repository():
    """Docstrings cite the protocol and method notes by path (``docs/...``): a user who has only the
    repository can open each of them."""
    cited = set()
    for path in [
        ROOT / "README.md",
        *(p for d in ("ccpurify", "exporters", "benchmarks", "docs") for p in (ROOT / d).rglob("*.*")),
    ]:
        if path.suffix in (".py", ".md"):
            cited |= set(re.findall(r"\bdocs/[\w/.-]+\.md", path.read_text()))
    assert len(cited) >= 5
    assert not sorted(c for c in cited if not (ROOT / c).is_file())
    assert not re.search(r"(?<![\w/])specs/\w", "".join(p.read_text() for p in (ROOT / "ccpurify").rglob("*.py")))


def test_the_results_section_puts_the_limit_row_next_to_the_defaults():
    from benchmarks.update_readme import limit_line, results_section

    cells = {
        "cifar10-badnets|0.75|3": {"ca_before": 0.847, "ca": 0.839, "asr": 0.019, "macs_ratio": 0.74, "images": 48000}
    }
    line = limit_line(cells)
    assert "3 epochs" in line and "48,000" in line and "cifar10-badnets 84.7 → 83.9% at 0.74 MACs (ASR 1.9%)" in line
    summary = {"per_dataset": {}, "defaults": {}}
    assert line in results_section(summary, cells) and "The limit" not in results_section(summary)
