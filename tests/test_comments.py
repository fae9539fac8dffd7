"""Comments say why, in a line: no date, CPU name or timing in a comment or docstring under src/.
Measurements live in benchmarks/RESULTS.md, docs/speed.md and docs/native-layout.md, their history
in git. The native package's C and Python files are held to it like every other file."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lenetlab"

DATE = r"\b20\d\d-\d\d(-\d\d)?\b"
CPU = (r"\b(Zen ?\d|EPYC|Xeon|Intel|AMD|Ryzen|Graviton|Neoverse|Skylake|Ice Lake|Sapphire Rapids|"
       r"Apple M\d)\b|\bVMs?\b")
TIMING = r"\b\d+(\.\d+)?(-\d+(\.\d+)?)? ?(s|ms|us|µs|ns|sec|seconds|minutes|min)\b"
MEASURED = re.compile(f"{DATE}|{CPU}|{TIMING}")


def python_comments(text: str) -> list[tuple[int, str]]:
    """Each # comment and each line of each docstring, with its line number."""
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found += [(node.body[0].lineno + i, line) for i, line in enumerate(doc.splitlines())]
    return found


def c_comments(text: str) -> list[tuple[int, str]]:
    found = []
    for match in re.finditer(r"/\*.*?\*/|//[^\n]*", text, re.S):
        first = text.count("\n", 0, match.start()) + 1
        found += [(first + i, line) for i, line in enumerate(match.group(0).splitlines())]
    return found


def measured_comments() -> list[str]:
    problems = []
    for path in sorted(SRC.rglob("*")):
        if path.suffix == ".py":
            comments = python_comments(path.read_text(encoding="utf-8"))
        elif path.suffix in (".c", ".h"):
            comments = c_comments(path.read_text(encoding="utf-8"))
        else:
            continue
        problems += [f"{path.relative_to(SRC)}:{line}: {text.strip()}" for line, text in comments
                     if MEASURED.search(text)]
    return problems


def test_no_comment_narrates_a_measurement():
    assert measured_comments() == []


def test_the_check_finds_what_it_looks_for():
    """Each kind of measurement, as the comments held them before, is caught."""
    for comment in ("# 1.4 s of the 4.1 s a train took", "# (Zen 5 VM, 2026-12-03)", "# about 8 ms",
                    "# measured on the 2-core VMs", "# an Intel Xeon"):
        assert MEASURED.search(comment), comment
    for comment in ("# 61,750 parameters", "# validation 0.9282 against 0.9247", "# 2x2 pooling, stride 2"):
        assert not MEASURED.search(comment), comment
    assert c_comments("int x; /* 3 ms\n here */ // 2026-12-01\n") == [(1, "/* 3 ms"), (2, " here */"),
                                                                       (2, "// 2026-12-01")]
