"""The C harness (tests/native/native_harness.c) from Python: its builds, case files and a stand-in library.

HarnessLib takes the ctypes library's place wherever lenetlab.native takes lib= (NativeTrainer,
forward, supports): each ln_train_step or ln_forward call becomes a case file, the harness
process makes the call (under qemu-aarch64 for an aarch64 build), and the buffers the call may
write are copied back to the addresses they came from, as if the library had run in this
process. So the x86 parity tests run as they are on a build for another machine.

Also a command, for driving the harness by hand (cachegrind, for instance), with this
checkout's lenetlab importable (installed, or PYTHONPATH=src):
    python tests/support/harness.py case OUT.case [--recipe baseline] [--batch 64]
    python tests/support/harness.py build           # prints the host harness's path
    HARNESS OUT.case RESULT --steps 20
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from lenetlab import native
from lenetlab.model import LeNet5V1

HARNESS = Path(__file__).resolve().parents[1] / "native" / "native_harness.c"
RUN_TIMEOUT_S = 300
_TYPES = {"f32": np.float32, "f64": np.float64, "i64": np.int64, "i32": np.int32}


def source() -> str:
    """The harness with the native library's source (native.source_text()) in place of its
    #include: one text, so that the build cache's key covers every file."""
    step = native.source_text()
    text = HARNESS.read_text()
    include = f'#include "{native.ROOT}"\n'
    assert include in text, f"{HARNESS} no longer includes {native.ROOT}"
    return text.replace(include, f'#line 1 "{native.ROOT}"\n{step}\n#line {_line_after(text, include)} '
                                  f'"native_harness.c"\n')


def _line_after(text: str, line: str) -> int:
    return text[:text.index(line)].count("\n") + 2


def build(flags: tuple[str, ...], cc: str | None = None, name: str = "native_harness") -> Path:
    """The harness compiled by cc (default: native.compiler()) with flags, as an executable
    (flags without native.LIBRARY_FLAGS), in native's build cache. Raises native.NativeBuildError."""
    return native.build(source(), name, tuple(f for f in flags if f not in native.LIBRARY_FLAGS), cc=cc)


def _counts() -> dict:
    """The length of every buffer the record points to, in elements, from the record (ln_args'
    comments in native/record.c), and of each slot of its arrays of pointers (from the model)."""
    with torch.random.fork_rng(devices=[]):  # a throwaway model: no other test's draws move
        model = LeNet5V1(True, True)
    params = [t.numel() for t in native.binding.slots(model)]
    return {
        "buffers": {"x": lambda a: a.rows * 784, "y": lambda a: a.rows, "idx": lambda a: a.batch,
                    "drop": lambda a: a.batch * 120, "totals": lambda a: 2, "out": lambda a: a.rows * 10,
                    "move": lambda a: a.batch, "erase_rows": lambda a: a.batch * 28,
                    "erase_cols": lambda a: a.batch * 28, "mix_with": lambda a: a.batch,
                    "mix_lam": lambda a: a.batch, "mix_box": lambda a: a.batch * 4,
                    "targets": lambda a: a.batch * 10},
        "slots": {"params": params, "s1": params, "s2": params, "steps": [1] * len(params),
                  "run": [t.numel() for t in native.binding.buffers(model)[:4]], "nbt": [1, 1]},
    }


_COUNTS = _counts()


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str  # scalar, buffer or slots
    type: str  # f32, f64, i64 or i32
    out: bool  # whether the call may write what it points to


class HarnessLib:
    """lenetlab.native's library as the harness process: command is the harness (after an emulator,
    if any). Its vector width and the record's fields are what the harness says (--info)."""

    def __init__(self, command: tuple[str, ...]) -> None:
        self.command = command
        info = self._run("--info").stdout.split("\n")
        self.fields: dict[str, Field] = {}
        values = {}
        for line in filter(None, info):
            key, *rest = line.split()
            if key == "field":
                self.fields[rest[0]] = Field(rest[1], rest[2], rest[3] == "out")
            else:
                values[key] = int(rest[0])
        self.vector_bytes, self.abi = values["vector_bytes"], values["abi"]
        assert self.abi == native.ABI and list(self.fields) == [n for n, _ in native.StepArgs._fields_], (
            f"the harness's record ({self.abi}: {list(self.fields)}) is not native.StepArgs")

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(self.command)} {' '.join(args)} ended with {done.returncode}: "
                               f"{done.stderr.strip()[-2000:]}")
        return done

    def ln_vector_bytes(self) -> int:
        return self.vector_bytes

    def ln_ws_new(self) -> int:
        return 1  # each call's process makes its own workspace

    def ln_ws_free(self, ws) -> None:
        pass

    def ln_train_step(self, ws, a: native.StepArgs) -> int:
        return self._call("step", a)

    def ln_forward(self, ws, a: native.StepArgs) -> int:
        return self._call("forward", a)

    def _call(self, entry: str, a: native.StepArgs) -> int:
        with tempfile.TemporaryDirectory(prefix="lenetlab-harness-") as tmp:
            case, out = Path(tmp) / "call.case", Path(tmp) / "call.out"
            addresses = self.write_case(case, entry, a)
            self._run(str(case), str(out))
            rc, entries = read(out, "lnout")
        for name, values in entries.items():
            ctypes.memmove(addresses[name], values.ctypes.data, values.nbytes)
        return rc

    def write_case(self, path: Path, entry: str, a: native.StepArgs) -> dict[str, int]:
        """The call as a case file; returns the address each written-back entry came from."""
        addresses = {}
        with open(path, "wb") as f:
            f.write(f"lncase 1 {entry}\n".encode())
            for name, field in self.fields.items():
                dtype = _TYPES[field.type]
                if field.kind == "scalar":
                    _entry(f, name, field.type, np.array([getattr(a, name)], dtype=dtype))
                    continue
                pointer = getattr(a, name)
                if not pointer:
                    continue
                if field.kind == "buffer":
                    sizes = {name: (pointer, self._length(name, "buffers")(a))}
                else:
                    slots = (ctypes.c_void_p * len(self._length(name, "slots"))).from_address(pointer)
                    sizes = {f"{name}[{i}]": (p, n) for i, (p, n) in
                             enumerate(zip(slots, self._length(name, "slots"))) if p}
                for key, (p, n) in sizes.items():
                    values = np.frombuffer(ctypes.string_at(p, n * np.dtype(dtype).itemsize), dtype=dtype)
                    _entry(f, key, field.type, values)
                    if field.out:
                        addresses[key] = p
        return addresses

    @staticmethod
    def _length(name: str, kind: str):
        try:
            return _COUNTS[kind][name]
        except KeyError:
            raise KeyError(f"tests/support/harness.py knows no length for ln_args.{name}: "
                           "add it to _counts") from None


def _entry(f, name: str, type_name: str, values: np.ndarray) -> None:
    f.write(f"{name} {type_name} {len(values)}\n".encode())
    f.write(values.tobytes())


def read(path: Path, stamp: str) -> tuple[int | str, dict[str, np.ndarray]]:
    """A case ("lncase") or output ("lnout") file: its header's last word (the entry point, or
    the call's return value as an int) and its entries by name."""
    data = path.read_bytes()
    end = data.index(b"\n")
    head = data[:end].decode().split()
    if head[:2] != [stamp, "1"] or len(head) != 3:
        raise ValueError(f"{path}: not a version 1 {stamp} file (it starts {data[:40]!r})")
    entries, at = {}, end + 1
    while at < len(data):
        end = data.index(b"\n", at)
        name, type_name, count = data[at:end].decode().split()
        dtype = np.dtype(_TYPES[type_name])
        at = end + 1 + int(count) * dtype.itemsize
        entries[name] = np.frombuffer(data[end + 1:at], dtype=dtype)
    return (int(head[2]) if stamp == "lnout" else head[2]), entries


class _Recorder(HarnessLib):
    """A HarnessLib whose calls are only written down, to path (the command's 'case')."""

    def __init__(self, command: tuple[str, ...], path: Path) -> None:
        super().__init__(command)
        self.path = path

    def _call(self, entry: str, a: native.StepArgs) -> int:
        self.write_case(self.path, entry, a)
        return 0


def main(argv: list[str] | None = None) -> int:
    from lenetlab.recipes import RECIPES
    from lenetlab.training import make_optimizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    case = sub.add_parser("case", help="write one training step of a recipe as a case file")
    case.add_argument("out", type=Path)
    case.add_argument("--recipe", default="baseline", choices=sorted(RECIPES))
    case.add_argument("--batch", type=int, default=64)
    sub.add_parser("build", help="build the host harness (native.build_flags()) and print its path")
    args = parser.parse_args(argv)
    flags = native.build_flags()
    if flags is None:
        print(f"harness: the native step cannot be built here: {native.unavailable_reason()}",
              file=sys.stderr)
        return 2
    exe = build(flags)
    if args.command == "build":
        print(exe)
        return 0
    recipe = RECIPES[args.recipe]
    torch.manual_seed(0)
    model = LeNet5V1(recipe.use_dropout, recipe.use_batch_norm, recipe.dropout_rate,
                     activation=recipe.activation, pool=recipe.pool).train()
    recorder = _Recorder((str(exe),), args.out)
    trainer = native.NativeTrainer(model, make_optimizer(recipe, model.parameters()),
                                   label_smoothing=recipe.label_smoothing, lib=recorder)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    keep = (torch.rand((args.batch, 120), generator=g) >= recipe.dropout_rate) / (1 - recipe.dropout_rate)
    trainer.train_step(x, y, keep.float() if recipe.use_dropout else None)
    print(f"wrote {args.out}: one {args.recipe} step of batch {args.batch}; "
          f"run: {exe} {args.out} OUT --steps N")
    return 0


if __name__ == "__main__":
    sys.exit(main())
