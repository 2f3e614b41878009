"""The README's two opening commands are what CI and users run: keep them and .ci/run in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fenced_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_install_demo_and_test_commands():
    blocks = fenced_blocks((ROOT / "README.md").read_text())
    install, tests = blocks[0], blocks[1]
    assert "pip install -c constraints.txt -e '.[test]'" in install and install.endswith("pcache demo")
    assert tests.startswith(".venv/bin/python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    tests = fenced_blocks((ROOT / "README.md").read_text())[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
    assert any("pip install" in line and "-c constraints.txt" in line for line in ci_lines)


def test_constraints_pin_the_matched_torch_pair():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
