"""The floors of the house (docs/architecture.md), checked on the source: what each layer may import, and the
shared basics that must exist exactly once."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each butd package and what it may import of butd (besides itself and butd.errors). Lower floors first.
FLOORS: dict[str, set[str]] = {
    "butd.core": set(),
    "butd.detector": set(),
    "butd.config": {"butd.core"},
    "butd.data": {"butd.core"},
    "butd.metrics": {"butd.core", "butd.data"},
    "butd.models": {"butd.core", "butd.config"},
    "butd.decoding": {"butd.core", "butd.config", "butd.models"},
    "butd.inference": {"butd.core", "butd.data", "butd.decoding"},
    "butd.evaluate": {"butd.core", "butd.config", "butd.data", "butd.decoding", "butd.inference", "butd.metrics",
                      "butd.models"},
    "butd.captioner": {"butd.core", "butd.data", "butd.decoding", "butd.detector", "butd.models"},
    "butd.visualize": {"butd.core", "butd.captioner"},
    "butd.train": {"butd.core", "butd.config", "butd.data", "butd.decoding", "butd.inference", "butd.metrics",
                   "butd.models"},
}
FEATURE_EXTRACTION_USERS = {"butd.captioner", "butd.serve", "butd.gallery"}  # where butd joins the detector package


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("path", modules("butd"), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_its_floor_and_below(path):
    own = package_of(module_name(path))
    if own not in FLOORS:
        return  # top floors (serve, gallery) and the package root may import any floor below them
    allowed = FLOORS[own] | {own, "butd.errors"}
    wrong = sorted(n for n in imported(path) if n.startswith("butd.") and package_of(n) not in allowed)
    assert not wrong, f"{own} may import {sorted(allowed)}; found {wrong}"
    if own not in FEATURE_EXTRACTION_USERS:
        assert not any(n.split(".")[0] == "feature_extraction" for n in imported(path))


def test_nothing_outside_training_imports_it():
    users = [str(p.relative_to(ROOT)) for p in modules("butd") if "butd/train/" not in str(p)
             and any(package_of(n) == "butd.train" for n in imported(p))]
    assert users == []


SOURCES = [p for folder in ("butd", "feature_extraction", "tools", "benchmarks") for p in modules(folder)]


def defining(pattern: str) -> list[str]:
    regex = re.compile(pattern, re.MULTILINE)
    return sorted(str(p.relative_to(ROOT)) for p in SOURCES if regex.search(p.read_text(encoding="utf-8")))


def test_shared_basics_are_written_once():
    assert defining(r"os\.replace\(|tempfile\.mkstemp\(|\.replace\(self\.path\)") == ["butd/core/files.py"]
    assert defining(r"^\s*(PAD|BOS|EOS|UNK)\s*(,\s*\w+\s*)*=\s*\d") == ["butd/core/tokens.py"]
    assert defining(r"^def words_of\(") == ["butd/core/tokens.py"]
    assert defining(r"^def resolve_device\(") == ["butd/core/devices.py"]
    assert defining(r"^def collate\(") == ["butd/core/batch.py"]
    assert defining(r"^def (save|load)_checkpoint\(") == ["butd/core/checkpoint.py"]
