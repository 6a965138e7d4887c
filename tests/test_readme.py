"""The README's examples are executed, so they stay true."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_quickstart():
    assert _python_blocks(), "README.md lost its ```python quickstart block"


def test_readme_quickstart_runs():
    import torch

    torch._dynamo.reset()
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # noqa: S102 - executing our own docs


def test_readme_commands_exist():
    text = README.read_text()
    for cmd in (
        "python -m pip install -r requirements-dev.txt",
        "python -m pip install --no-build-isolation -e .",
        "structure-ops demo",
        "python -m pytest -q tests",
    ):
        assert cmd in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -r requirements-dev.txt" in ci and "pip install --no-build-isolation -e ." in ci
    assert "-m pytest -q tests" in ci
