"""The README's examples run, and CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_python_api_example_runs():
    (example,) = code_blocks("python")
    assert len(example.strip().splitlines()) <= 12
    exec(compile(example, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = [line.strip() for block in code_blocks("bash") for line in block.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, "the README names exactly two set-up commands"
    demo, tests = commands
    assert demo.endswith("ccpurify demo") and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
