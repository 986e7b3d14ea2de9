"""The project's own gates: strict typing, lint, and generated code matching its schema."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_mypy_strict_is_clean_on_runner_plugins_and_tests() -> None:
    result = run(sys.executable, "-m", "mypy", "runner", "plugins", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "runner", "plugins", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("flatc") is None, reason="flatc (flatbuffers-compiler) missing")
def test_generated_code_is_what_flatc_makes_of_the_schema(tmp_path: Path) -> None:
    copy = tmp_path / "ext_plugin_proto"
    shutil.copytree(ROOT / "ext_plugin_proto", copy, ignore=shutil.ignore_patterns("__pycache__"))
    result = run("bash", str(copy / "regenerate.sh"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    theirs = ROOT / "ext_plugin_proto" / "A6"
    ours = copy / "A6"
    differing = []
    for path in sorted(ours.rglob("*.py")):
        twin = theirs / path.relative_to(ours)
        if not twin.exists() or not filecmp.cmp(path, twin, shallow=False):
            differing.append(str(path.relative_to(ours)))
    committed = {p.relative_to(theirs) for p in theirs.rglob("*.py")}
    regenerated = {p.relative_to(ours) for p in ours.rglob("*.py")}
    stale = "ext_plugin_proto is stale: run ext_plugin_proto/regenerate.sh"
    assert not differing, f"{stale} ({differing})"
    assert committed == regenerated, stale
