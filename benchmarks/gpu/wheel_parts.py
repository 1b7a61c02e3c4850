"""Carry wheels too large for one device call in parts, and join and install them there.

A device call carries at most 64 MiB of files (the repository included), but files it leaves under /tmp
stay while the machine is kept warm by calls that follow each other quickly. So a wheel travels as parts:

    split WHEEL... --out PARTS [--size BYTES] [--manifest FILE]   here: parts and a manifest of sha256s
    append PARTS STAGE [--manifest FILE]    there, once per call: append each carried part to STAGE
    install STAGE TARGET [--manifest FILE]  there, last: check every wheel's sha256, pip install --target

The manifest (benchmarks/gpu/wheels.json, tracked) names each wheel, its sha256 and size, and its parts'.
Parts are appended strictly in order; a part whose sha256 differs is refused, and a part already appended
is skipped, so a call can be repeated. Exit codes: 0 done, 2 damaged or out of order, 4 pip failed, 10 parts
missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

MANIFEST = Path(__file__).with_name("wheels.json")
PART_SIZE = 60_000_000  # a part, the repository and the call's other files stay under 64 MiB
DAMAGED, PIP_FAILED, MISSING = 2, 4, 10


class PartsError(Exception):
    """A part or a joined wheel that cannot be used; `code` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(wheels: list[Path], out: Path, size: int = PART_SIZE, manifest: Path = MANIFEST) -> dict:
    """Cut each wheel into parts of at most `size` bytes in `out`; write and return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"part_size": size, "wheels": []}
    for wheel in wheels:
        parts = []
        with open(wheel, "rb") as f:
            for index, chunk in enumerate(iter(lambda: f.read(size), b"")):
                name = f"{wheel.name}.part{index:02d}"
                (out / name).write_bytes(chunk)
                parts.append({"name": name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
        record["wheels"].append({"name": wheel.name, "size": wheel.stat().st_size, "sha256": sha256(wheel),
                                 "parts": parts})
    manifest.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _state_path(stage: Path, wheel: dict) -> Path:
    return stage / f"{wheel['name']}.appended"


def appended(stage: Path, wheel: dict) -> int:
    """How many of `wheel`'s parts STAGE holds."""
    try:
        return int(_state_path(stage, wheel).read_text())
    except (OSError, ValueError):
        return 0


def append(parts: Path, stage: Path, manifest: Path = MANIFEST) -> list[str]:
    """Append every carried part that is the next one its wheel expects; returns a status line per wheel."""
    stage.mkdir(parents=True, exist_ok=True)
    lines = []
    for wheel in json.loads(manifest.read_text())["wheels"]:
        done = appended(stage, wheel)
        for index, part in enumerate(wheel["parts"]):
            path = parts / part["name"]
            if index < done or not path.exists():
                continue
            if index > done:
                raise PartsError(f"{part['name']} was carried but part {done} of {wheel['name']} has not been "
                                 f"appended yet (a fresh machine has lost the earlier parts): start again from "
                                 f"part 0", DAMAGED)
            if sha256(path) != part["sha256"]:
                raise PartsError(f"{part['name']} is damaged (its sha256 differs from {manifest.name}); split the "
                                 "wheel again", DAMAGED)
            partial = stage / f"{wheel['name']}.partial"
            offset = sum(p["size"] for p in wheel["parts"][:done])
            with open(partial, "r+b" if partial.exists() else "wb") as f:
                f.seek(offset)
                f.truncate()  # bytes of an append that stopped before its count was written
                f.write(path.read_bytes())
            _write_atomically(_state_path(stage, wheel), str(index + 1))
            done = index + 1
        lines.append(f"{wheel['name']}: {done}/{len(wheel['parts'])} parts")
    return lines


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    os.replace(temp, path)


def install(stage: Path, target: Path, manifest: Path = MANIFEST) -> list[Path]:
    """Check each joined wheel's sha256 and `pip install --no-deps --target TARGET` them all; their paths."""
    wheels = json.loads(manifest.read_text())["wheels"]
    missing = [f"{w['name']} ({appended(stage, w)}/{len(w['parts'])} parts)" for w in wheels
               if appended(stage, w) < len(w["parts"])]
    if missing:
        raise PartsError(f"parts still to carry: {', '.join(missing)}", MISSING)
    joined = []
    for wheel in wheels:
        partial, whole = stage / f"{wheel['name']}.partial", stage / wheel["name"]
        if partial.exists():
            with open(partial, "r+b") as f:
                f.truncate(wheel["size"])
            if sha256(partial) != wheel["sha256"]:
                partial.unlink()
                _state_path(stage, wheel).unlink()
                raise PartsError(f"the joined {wheel['name']} is damaged (sha256 differs); start again from part 0",
                                 DAMAGED)
            os.replace(partial, whole)
        elif not whole.exists() or sha256(whole) != wheel["sha256"]:
            raise PartsError(f"{whole} is missing or damaged; start again from part 0", DAMAGED)
        joined.append(whole)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--no-compile", "--upgrade", "--target", str(target), *map(str, joined)])
    if done.returncode:
        raise PartsError(f"pip could not install the joined wheels into {target} (exit {done.returncode}, its "
                         f"message above); they are intact in {stage}, so a rerun tries again", PIP_FAILED)
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    cut = verbs.add_parser("split")
    cut.add_argument("wheels", nargs="+", type=Path)
    cut.add_argument("--out", type=Path, required=True)
    cut.add_argument("--size", type=int, default=PART_SIZE)
    join = verbs.add_parser("append")
    join.add_argument("parts", type=Path)
    join.add_argument("stage", type=Path)
    put = verbs.add_parser("install")
    put.add_argument("stage", type=Path)
    put.add_argument("target", type=Path)
    for verb in (cut, join, put):
        verb.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    try:
        if args.verb == "split":
            record = split(args.wheels, args.out, args.size, args.manifest)
            print("\n".join(f"{w['name']}: {len(w['parts'])} parts, sha256 {w['sha256']}" for w in record["wheels"]))
        elif args.verb == "append":
            print("\n".join(append(args.parts, args.stage, args.manifest)))
        else:
            print("installed " + ", ".join(p.name for p in install(args.stage, args.target, args.manifest)))
    except PartsError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
