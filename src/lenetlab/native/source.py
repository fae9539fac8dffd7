"""The C source of the native library: its files in this folder, and the one text that is compiled.

lenet5.c is the root: it #includes every other file, so the library is one translation unit
(the compiler sees every kernel, and inlines them, as it did when they were one file).
source_text() gives the root with each local #include replaced by the file itself (with #line
markers, so that the compiler's messages name the right file): the build cache keys on that
text, so a change to any file builds afresh.
"""

from __future__ import annotations

import re
from pathlib import Path

FOLDER = Path(__file__).parent
ROOT = "lenet5.c"
_INCLUDE = re.compile(r'^#include "([^"/]+)"\s*$')


def files(folder: Path = FOLDER) -> list[Path]:
    """The C files of the library (.c and .h), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix in (".c", ".h"))


def source_text(folder: Path = FOLDER, root: str = ROOT) -> str:
    """root with every #include "name" of a file in folder expanded in place, recursively."""
    return _expand(folder, root, set())


def _expand(folder: Path, name: str, seen: set[str]) -> str:
    if name in seen:
        raise ValueError(f"{folder / name} is included twice")
    seen.add(name)
    out = []
    lines = (folder / name).read_text().splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        match = _INCLUDE.match(line)
        if match and (folder / match.group(1)).is_file():
            out.append(f'#line 1 "{match.group(1)}"\n')
            out.append(_expand(folder, match.group(1), seen))
            out.append(f'#line {number + 1} "{name}"\n')
        else:
            out.append(line)
    return "".join(out)
