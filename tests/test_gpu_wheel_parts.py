"""benchmarks/gpu/wheel_parts.py, the device script's install logic, on a small fake wheel: split here, one part
per call appended in a stage folder, joined, checked and installed with pip, and the result imports. Damaged,
missing and out-of-order parts are refused with the exit codes the device script reads."""

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu" / "wheel_parts.py"
NAME = "spx_fake_gpu-1.0-py3-none-any.whl"


def fake_wheel(folder: Path, wheel_name: str = NAME) -> Path:
    """A pure-Python wheel pip installs offline, with an incompressible file so that it spans several parts."""
    files = {"spx_fake_gpu/__init__.py": b"VALUE = 42\n", "spx_fake_gpu/blob.bin": os.urandom(6000),
             "spx_fake_gpu-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: spx-fake-gpu\nVersion: 1.0\n",
             "spx_fake_gpu-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                 b"Tag: py3-none-any\n"}
    record = io.StringIO()
    for name, data in files.items():
        digest = hashlib.sha256(data).digest()
        record.write(f"{name},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}\n")
    record.write("spx_fake_gpu-1.0.dist-info/RECORD,,\n")
    path = folder / wheel_name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("spx_fake_gpu-1.0.dist-info/RECORD", record.getvalue())
    return path


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def parts(tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    manifest = tmp_path / "wheels.json"
    done = run("split", fake_wheel(made), "--out", tmp_path / "parts", "--size", 2000, "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert len(names) == 4 and all(n.startswith(NAME + ".part") for n in names)
    return tmp_path, manifest, names


def carry(tmp_path: Path, name: str) -> Path:
    """The repository as one device call sees it: only the part that call carries."""
    call = tmp_path / "call"
    shutil.rmtree(call, ignore_errors=True)
    call.mkdir()
    shutil.copy(tmp_path / "parts" / name, call / name)
    return call


def test_parts_carried_one_per_call_install_a_wheel_that_imports(parts):
    tmp_path, manifest, names = parts
    stage, site = tmp_path / "stage", tmp_path / "site"
    for i, name in enumerate(names):
        done = run("install", stage, site, "--manifest", manifest)
        assert done.returncode == 10 and f"{NAME} ({i}/4 parts)" in done.stderr
        call = carry(tmp_path, name)
        for _ in range(2):  # a repeated call appends nothing twice
            done = run("append", call, stage, "--manifest", manifest)
            assert done.returncode == 0 and f"{NAME}: {i + 1}/4 parts" in done.stdout, done.stderr
    done = run("install", stage, site, "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    imported = subprocess.run([sys.executable, "-c", "import spx_fake_gpu; print(spx_fake_gpu.VALUE)"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert imported.stdout.strip() == "42", imported.stderr


def test_a_damaged_part_is_refused(parts):
    tmp_path, manifest, names = parts
    call = carry(tmp_path, names[0])
    data = bytearray((call / names[0]).read_bytes())
    data[100] ^= 0xFF
    (call / names[0]).write_bytes(bytes(data))
    done = run("append", call, tmp_path / "stage", "--manifest", manifest)
    assert done.returncode == 2 and "is damaged" in done.stderr


def test_a_part_after_a_gap_says_to_start_again(parts):
    """A call that finds a fresh machine (the earlier parts gone with the last one) must not append part 1."""
    tmp_path, manifest, names = parts
    done = run("append", carry(tmp_path, names[1]), tmp_path / "stage", "--manifest", manifest)
    assert done.returncode == 2 and "start again from part 0" in done.stderr
    assert not (tmp_path / "stage" / f"{NAME}.partial").exists()


def test_an_append_cut_short_is_redone_and_a_damaged_join_is_caught(parts):
    tmp_path, manifest, names = parts
    stage, site = tmp_path / "stage", tmp_path / "site"
    assert run("append", carry(tmp_path, names[0]), stage, "--manifest", manifest).returncode == 0
    with open(stage / f"{NAME}.partial", "ab") as f:  # bytes of the next append, its count never written
        f.write(b"half a part")
    for name in names[1:]:
        assert run("append", carry(tmp_path, name), stage, "--manifest", manifest).returncode == 0
    partial = stage / f"{NAME}.partial"
    data = bytearray(partial.read_bytes())
    data[-1] ^= 0xFF  # the disk changed it after every part checked out
    partial.write_bytes(bytes(data))
    done = run("install", stage, site, "--manifest", manifest)
    assert done.returncode == 2 and "start again from part 0" in done.stderr
    assert not partial.exists() and not (site / "spx_fake_gpu").exists()


def test_a_wheel_pip_refuses_is_an_exit_code_and_stays_joined(tmp_path):
    """A wheel for another Python (what a cp312 wheel is to this 3.11): pip's refusal is exit 4, not a traceback."""
    foreign = "spx_fake_gpu-1.0-cp39-cp39-win_arm64.whl"
    manifest = tmp_path / "wheels.json"
    split = run("split", fake_wheel(tmp_path, foreign), "--out", tmp_path / "parts", "--manifest", manifest)
    assert split.returncode == 0
    assert run("append", tmp_path / "parts", tmp_path / "stage", "--manifest", manifest).returncode == 0
    done = run("install", tmp_path / "stage", tmp_path / "site", "--manifest", manifest)
    assert done.returncode == 4 and "pip could not install" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "stage" / foreign).read_bytes() == (tmp_path / foreign).read_bytes()
