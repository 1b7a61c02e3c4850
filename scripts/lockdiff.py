"""What changed between two sets of pinned versions (used by scripts/relock and scripts/canary).

    python scripts/lockdiff.py table OLD_LOCK NEW_LOCK          a table of every package whose pin changed
    python scripts/lockdiff.py failures PYTEST_LOG FREEZE LOCK   one line per failed test, naming the installed
                                                                 versions that differ from the lock
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")
OUTCOME = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")


def pins(path: str) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line in a lock or `pip freeze` output."""
    out = {}
    for line in Path(path).read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            out[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2].split("+")[0]
    return out


def changes(old: dict[str, str], new: dict[str, str]) -> list[tuple[str, str, str]]:
    names = sorted(set(old) | set(new))
    return [(n, old.get(n, "-"), new.get(n, "-")) for n in names if old.get(n) != new.get(n)]


def table(old_lock: str, new_lock: str) -> None:
    rows = changes(pins(old_lock), pins(new_lock))
    if not rows:
        print(f"{new_lock}: no version changed")
        return
    width = max(len(n) for n, _, _ in rows)
    print(f"{new_lock}: {len(rows)} changed")
    print(f"  {'package':<{width}}  {'was':<14} now")
    for name, was, now in rows:
        print(f"  {name:<{width}}  {was:<14} {now}")


def failures(log: str, freeze: str, lock: str) -> int:
    newer = ", ".join(f"{n} {was}->{now}" for n, was, now in changes(pins(lock), pins(freeze)) if "-" not in (was, now))
    count = 0
    for line in Path(log).read_text(errors="replace").splitlines():
        match = OUTCOME.match(line)
        if match:
            count += 1
            reason = (match[3] or "")[:160]
            print(f"canary: {match[1]} {match[2]}: {reason} [differs from the lock: {newer or 'nothing'}]")
    return count


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "table":
        table(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "failures":
        sys.exit(1 if failures(*sys.argv[2:]) else 0)
    else:
        sys.exit(__doc__)
