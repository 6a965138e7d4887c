"""The README and docs/ stay true: their Python examples run, their commands parse, their links resolve, the
two set-up commands exist and CI runs the README's test command, and every document the sources cite ships."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
EXECUTED = [README, ROOT / "docs" / "api.md"]  # every ```python block of these runs here (```py blocks do not)
SOURCE_DIRS = ("structure_ops", "tests", "benchmarks", "csrc", "tools", "python", "docs")
TEXT_SUFFIXES = {".py", ".md", ".cpp", ".cu", ".h", ".cuh", ".txt", ".toml", ".sh", ".cfg"}


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"README.md lost its '## {title}' section"
    return m.group(1)


def test_readme_has_a_five_line_api_example():
    api = _section(README.read_text(), "The API in five lines")
    blocks = re.findall(r"```python\n(.*?)```", api, flags=re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 5


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: p.name)
def test_python_examples_run(path):
    import torch

    blocks = _blocks(path, "python")
    assert blocks, f"{path.name} has no ```python example"
    torch._dynamo.reset()
    for block in blocks:
        exec(compile(block, str(path), "exec"), {"__name__": "readme"})  # noqa: S102 - executing our own docs


def test_two_commands_set_up_and_run_demo_and_tests():
    two = _section(README.read_text(), "Two commands")
    first = re.search(r"```bash\n(.*?)```", two, flags=re.S).group(1)
    commands = [ln.split("#", 1)[0].strip() for ln in first.splitlines() if ln.split("#", 1)[0].strip()]
    assert commands == ["bash tools/setup_and_demo.sh", "bash tools/setup_and_test.sh"]
    setup = (ROOT / "tools" / "setup.sh").read_text()
    assert "pip install -q -r requirements-dev.txt" in setup and "pip install -q --no-build-isolation -e ." in setup
    assert "tools/build_is_fresh.py" in setup  # the rebuild is skipped when nothing changed: idempotent
    for name, runs in (("setup_and_demo.sh", "-m structure_ops demo"), ("setup_and_test.sh", "-m pytest -q tests")):
        script = (ROOT / "tools" / name).read_text()
        assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"' in script and runs in script
    # requirements pin what the set-up installs on a CPU machine
    reqs = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^torch==\d", reqs, flags=re.M) and re.search(r"^triton==\d", reqs, flags=re.M)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    via_script = "tools/setup_and_test.sh" in ci
    by_hand = ("pip install -r requirements-dev.txt" in ci and "pip install --no-build-isolation -e ." in ci
               and "-m pytest -q tests" in ci)
    assert via_script or by_hand, ".ci/run no longer runs the README's set-up and test command"


def _cli_lines(path: Path) -> list[str]:
    out = []
    for block in _blocks(path, "bash"):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #", 1)[0].strip()
            if "structure-ops " in cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_documented_commands_parse(path, capsys):
    from structure_ops.cli import build_parser

    for cmd in _cli_lines(path):
        words = shlex.split(cmd)
        argv = words[words.index("structure-ops") + 1 :]
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{path.name}: `{cmd}` does not parse ({capsys.readouterr().err.strip()}; exit {e.code})")


@pytest.mark.parametrize("path", [README, *DOCS, ROOT / "benchmarks" / "README.md", ROOT / "python" / "README.md"],
                         ids=lambda p: p.name)
def test_links_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#", 1)[0]).resolve()
        assert file.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def _source_files():
    yield README
    for d in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(ROOT / d):
            dirnames[:] = [n for n in dirnames if not n.startswith(".") and n not in ("__pycache__", "results")]
            for f in filenames:
                if Path(f).suffix in TEXT_SUFFIXES:
                    yield Path(dirpath) / f


def test_every_cited_document_ships():
    """Sources cite the project's docs (docs/spec.md §N, docs/kernels.md §N), never notes outside the repository,
    and each cited section exists."""
    foreign, missing = [], []
    sections = {}
    for name in ("spec", "kernels"):
        text = (ROOT / "docs" / f"{name}.md").read_text()
        sections[name] = set(re.findall(r"^## (\d+)\.", text, flags=re.M))
    for path in _source_files():
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        for m in re.finditer(r"(?<![\w/])(SPEC|KERNELS|ENVIRONMENT|CONVENTIONS)\.md", text):
            foreign.append(f"{rel}: {m.group(0)}")
        for m in re.finditer(r"docs/(spec|kernels)\.md[’']?s? (?:§\s?(\d+)|\(§(\d+))", text):
            n = m.group(2) or m.group(3)
            if n not in sections[m.group(1)]:
                missing.append(f"{rel}: {m.group(0)}")
        for m in re.finditer(r"\bdocs/[\w./-]+\.md", text):
            if not (ROOT / m.group(0)).is_file():
                missing.append(f"{rel}: {m.group(0)}")
    assert not foreign, f"citations of documents that are not in the repository: {foreign}"
    assert not missing, f"citations of missing documents or sections: {missing}"
