"""The length of every function in the native sources: C from signature to closing brace, Python by ast.

    python tests/support/shape.py      # prints every function over the limits, exits 1 if any
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

NATIVE = Path(__file__).resolve().parents[2] / "src" / "lenetlab" / "native"
C_LIMIT, PY_LIMIT = 80, 60
# a definition's first line: a type and a name, an opening parenthesis, at column 0, not a prototype
_C_START = re.compile(r"^(?:static |INLINE |const |unsigned |struct )*[A-Za-z_][\w ]*[\s*]\**(\w+)\s*\(")


def c_functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, first line, lines) of each function defined in a C file: from the line that starts
    its signature (at column 0) to its closing brace (a "}" at column 0)."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = _C_START.match(lines[i])
        if match and not lines[i].startswith(("typedef", "#", " ", "\t", "/*", "}")):
            j = i
            while j < len(lines) and not lines[j].rstrip().endswith((")", "{", ";", "}")):
                j += 1
            if j + 1 < len(lines) and lines[j].rstrip().endswith(";"):
                i = j + 1
                continue
            closes = (k for k in range(j, len(lines))
                      if re.match(r"^}\s*(/\*.*)?$", lines[k])
                      or (k == j and lines[k].rstrip().endswith("}")))
            end = next(closes, None)
            if end is not None:
                found.append((match.group(1), i + 1, end - i + 1))
                i = end + 1
                continue
        i += 1
    return found


def python_functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, first line, lines) of each function or method, decorators left out."""
    tree = ast.parse(path.read_text())
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def too_long(folder: Path = NATIVE) -> list[str]:
    """Every function over its limit, as 'file:line name (N lines)'."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".c", ".h"):
            functions, limit = c_functions(path), C_LIMIT
        elif path.suffix == ".py":
            functions, limit = python_functions(path), PY_LIMIT
        else:
            continue
        out += [f"{path.name}:{line} {name} ({n} lines, limit {limit})"
                for name, line, n in functions if n > limit]
    return out


if __name__ == "__main__":
    over = too_long()
    print("\n".join(over) or "every function within its limit")
    sys.exit(1 if over else 0)
