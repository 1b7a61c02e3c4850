"""The guards that keep CI honest: locked stacks, canary reports, and skips limited to known refusals."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from parity import KNOWN_PEFT_REFUSALS, skip_unless_peft_runs

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ["latest", "transformers4", "genai", "genai-bench"]
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][^\s;]*$")


def _pins(lock: Path) -> dict[str, str]:
    lines = [line.strip() for line in lock.read_text().splitlines()]
    return {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line.split("==")[1]
            for line in lines if line and not line.startswith("#")}


@pytest.mark.parametrize("name", LOCKS)
def test_every_lock_line_pins_one_exact_version(name):
    lines = [line.strip() for line in (ROOT / "locks" / f"{name}.txt").read_text().splitlines()]
    loose = [line for line in lines if line and not line.startswith("#") and not PIN.match(line)]
    assert not loose, f"locks/{name}.txt has lines that pin no exact version: {loose}"


def test_the_stacks_differ_only_where_transformers_4_needs_it():
    latest, old = _pins(ROOT / "locks/latest.txt"), _pins(ROOT / "locks/transformers4.txt")
    assert latest["transformers"].startswith("5.") and old["transformers"].startswith("4.")
    assert latest["torch"] == old["torch"] == "2.13.0"


def test_the_environment_is_exactly_its_lock():
    """scripts/test names the lock the running stack was installed from; every installed package must be at
    the lock's version (spexport itself and the installer excepted)."""
    lock = os.environ.get("SPEXPORT_LOCK")
    if lock is None:
        pytest.skip("not run by scripts/test (SPEXPORT_LOCK unset): the environment was not installed from a lock")
    pins = _pins(ROOT / lock)
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
                 for d in importlib.metadata.distributions()}
    off = {name: (version, pins.get(name)) for name, version in installed.items()
           if name not in ("spexport", "pip") and pins.get(name) != version.split("+")[0]}
    assert not off, f"installed versions that are not {lock}'s (installed, locked): {off}"


def test_a_known_peft_refusal_skips_only_on_its_transformers_major():
    major = int(transformers.__version__.split(".")[0])

    def refuses(message):
        def run(**_):
            raise ValueError(message)
        return run

    for message in KNOWN_PEFT_REFUSALS.get(major, ()):
        with pytest.raises(pytest.skip.Exception):
            skip_unless_peft_runs(refuses(message), {})
    with pytest.raises(ValueError, match="something else"):
        skip_unless_peft_runs(refuses("something else went wrong"), {})


def test_lockdiff_names_the_versions_that_moved(tmp_path):
    (tmp_path / "old.txt").write_text("torch==2.13.0\ntransformers==5.25.0\nnumpy==2.4.6\n")
    (tmp_path / "new.txt").write_text("torch==2.13.0+cpu\ntransformers==5.26.0\nonnx==1.24.0\n")
    table = subprocess.run([sys.executable, "scripts/lockdiff.py", "table", tmp_path / "old.txt",
                            tmp_path / "new.txt"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "transformers" in table and "5.26.0" in table and "numpy" in table and "onnx" in table
    assert "torch" not in table  # a local build label is no change
    (tmp_path / "log.txt").write_text("FAILED tests/test_x.py::test_y - AssertionError: boom\n1 failed\n")
    failed = subprocess.run([sys.executable, "scripts/lockdiff.py", "failures", tmp_path / "log.txt",
                             tmp_path / "new.txt", tmp_path / "old.txt"], cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == [
        "canary: FAILED tests/test_x.py::test_y: AssertionError: boom [differs from the lock: "
        "transformers 5.25.0->5.26.0]"]
