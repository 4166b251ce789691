"""README's install commands work from a checkout (cce-dist is not on PyPI)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_install_commands_use_the_checkout_and_existing_extras():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`(pip install [^`]*)`", readme)
    assert commands
    for command in commands:
        assert "cce-dist" not in command, command  # not on PyPI: install from the checkout
        for names in re.findall(r"\.\[([^\]]*)\]", command):
            for name in names.split(","):
                assert name.strip() in extras, command
    # The interpreter path (TRITON_INTERPRET=1 on the CPU) needs numpy; the README's extra has it.
    assert "numpy" in readme and "pip install -e '.[test]'" in readme
    assert any(dep.split(">")[0].split("=")[0].strip() == "numpy" for dep in extras["test"])
