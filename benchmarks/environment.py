"""The one record of where a benchmark ran, written into every results file: date, git commit, CPU, memory,
threads, Python and the versions of every package a benchmark compares.

    python -m benchmarks.environment      # prints this machine's record
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ["spexport", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "onnx-ir", "torch", "transformers",
            "peft", "optimum", "optimum-onnx", "onnxruntime-genai", "tokenizers"]
REPOSITORY = Path(__file__).resolve().parents[1]


def environment(threads: int | None = None) -> dict:
    """Where and on what this run happens; `threads` is what every engine was given (None: not fixed)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git_commit": git_commit(),
            "cpu": _cpu(), "cpus": os.cpu_count(), "threads": threads, "memory_gib": _memory_gib(),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions(),
            "load_average_at_start": list(os.getloadavg())}


def versions() -> dict[str, str]:
    """The installed version of each package in PACKAGES that is installed."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it ("unknown" outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe(record: dict) -> str:
    """One line for a Markdown report: date, commit, machine and the versions that matter."""
    shown = ", ".join(f"{name} {version}" for name, version in record["versions"].items())
    threads = f", {record['threads']} threads" if record.get("threads") else ""
    return (f"{record['date']}, commit {record['git_commit']}; {record['cpu']} ({record['cpus']} CPUs{threads}, "
            f"{record['memory_gib']} GiB); Python {record['python']}; {shown}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


if __name__ == "__main__":
    print(json.dumps(environment(), indent=2))
