"""The README's module map names every source module of the package, once, and nothing else;
and the files stay one idea each (at most 400 lines)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("export", "runtime", "calibration", "serve", "profiles", "fastsam2")
MAX_LINES = 400


def source_modules() -> set:
    return {str(p.relative_to(ROOT)) for room in ROOMS for p in (ROOT / room).rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts}


def mapped_modules() -> list:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Module map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "README.md has no '## Module map' section"
    return re.findall(r"^\s*[-*] `([\w/]+\.py)`", m.group(1), re.M)


def test_readme_module_map_matches_the_tree():
    listed = mapped_modules()
    dupes = sorted({x for x in listed if listed.count(x) > 1})
    assert not dupes, f"listed twice: {dupes}"
    have = source_modules()
    assert not sorted(have - set(listed)), f"modules missing from the README's map: {sorted(have - set(listed))}"
    assert not sorted(set(listed) - have), f"the map names files that do not exist: {sorted(set(listed) - have)}"


def test_source_files_are_at_most_400_lines():
    files = sorted(source_modules()) + [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")]
    long = {f: n for f in files if (n := len((ROOT / f).read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
