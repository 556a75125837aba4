"""The README's fenced code blocks, as tests/test_readme.py runs them.

A ```bash block either runs as written in a folder prepared like the README assumes, or its
first line says why it cannot here: `# needs: WHAT[, WHAT] (optional words)`, WHAT from NEEDS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# what a block may need that CI does not have
NEEDS = {
    "GPU": "an NVIDIA GPU (TensorRT, CUDA)",
    "Jetson": "a Jetson (JetPack's TensorRT and trtexec)",
    "camera": "a camera or a remote stream",
    "checkpoint": "the official SAM2 checkpoint (cannot be downloaded here)",
    "network": "downloads (pip, CLIP weights)",
    "server": "a server that runs until stopped, with a client in a second terminal",
    "long": "minutes of CPU (the demo at 1024 px, the test suite itself: CI runs those directly)",
}
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_NEEDS = re.compile(r"^#\s*needs:\s*(.*)$")


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence in README.md
    text: str
    needs: tuple  # () for a block that runs here

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def _needs(text: str) -> tuple:
    first = text.lstrip("\n").split("\n", 1)[0]
    m = _NEEDS.match(first.strip())
    if not m:
        return ()
    words = m.group(1).split("(")[0]  # the part before a parenthesised reason
    return tuple(w.strip() for w in words.split(",") if w.strip())


def blocks(text: str | None = None) -> list:
    """Every fenced block of the README (indented fences too, as in list items), in order."""
    lines = (README.read_text() if text is None else text).split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        code = "\n".join(body) + "\n"
        out.append(Block(lang, start + 1, code, _needs(code) if lang == "bash" else ()))
    return out


def paste_problems(code: str) -> list:
    """Lines that break when pasted into a shell: a `\\` that is not the line's last character
    (a comment after it ends the command there, and the next line runs on its own)."""
    bad = []
    for n, line in enumerate(code.split("\n"), 1):
        stripped = line.rstrip("\n")
        if re.search(r"\\\s+#", stripped) or (stripped.endswith((" ", "\t")) and stripped.rstrip().endswith("\\")):
            bad.append(f"line {n}: {stripped.strip()}")
    return bad


def commands(code: str) -> list:
    """(command, [--flags]) of each fastsam2-* command in a block, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.split("\n"):
        line = line.split(" #", 1)[0]
        for m in re.finditer(r"(?:^|[;&|]\s*)(fastsam2-[a-z]+)\b([^;&|]*)", line.strip()):
            out.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2))))
    return out
