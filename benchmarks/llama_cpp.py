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
    found["llama-bench --version"] = "; ".join((done.stdout + done.stderr).strip().splitlines())
    return found


def ggufs(model_dir: Path, out: Path, python: str, cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """F32, Q8_0 and Q4_1 GGUFs of the Hugging Face folder: the sdist's convert_hf_to_gguf.py writes F32, run by
    `python` (a venv with the converter's needs: torch, transformers 4, sentencepiece), with the sdist's own
    gguf-py first on its path; llama-quantize makes Q8_0 and Q4_1 from that F32 file."""
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "model-f32.gguf"
    if not f32.is_file():  # written under another name and renamed, so a killed run leaves no partial GGUF
        env = {**os.environ, "PYTHONPATH": str(cache / "src" / "gguf-py")}
        subprocess.run([python, str(cache / "src" / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                        "--outfile", str(f32) + ".part"], check=True, env=env, capture_output=True)
        os.replace(str(f32) + ".part", f32)
    made = {"F32": f32}
    for kind in ("Q8_0", "Q4_1"):
        path = out / f"model-{kind.lower()}.gguf"
        if not path.is_file():
            subprocess.run([str(cache / "build" / "bin" / "llama-quantize"), str(f32), str(path) + ".part", kind],
                           check=True, capture_output=True)
            os.replace(str(path) + ".part", path)
        made[kind] = path
    return made


def bench(gguf: Path, depth: int, new_tokens: int, threads: int, cache: Path = DEFAULT_CACHE) -> dict:
    """One `llama-bench` decode run (after its own warm-up): `new_tokens` tokens after `depth` tokens of context."""
    command = [str(cache / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1",
               "-p", "0", "-n", str(new_tokens), "-d", str(depth), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    decode = next(t for t in json.loads(done.stdout) if t["n_gen"] > 0)
    return {"ms_per_token": 1000.0 / decode["avg_ts"]}
