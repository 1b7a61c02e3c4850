"""The engines benchmarks/gpu.py compares, on a device ("cuda", or "cpu" for the rehearsal), and the facts it
records about that device. Each engine greedy-generates for a batch of rows (benchmarks/measure.py's verb)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.engines import Genai as CpuGenai

PROVIDERS = {"cuda": ["CUDAExecutionProvider"], "cpu": ["CPUExecutionProvider"]}


class Spexport:
    """spexport's runtime on the device's provider; rows may each have their own task."""

    def __init__(self, artifact: Path, device: str):
        from spexport.runtime import load

        self.model = load(artifact, providers=PROVIDERS[device])

    def generate(self, ids: np.ndarray, tasks: list[str], new_tokens: int) -> np.ndarray:
        return self.model.generate(ids, task=tasks, max_new_tokens=new_tokens)[:, ids.shape[1]:]

    def logits(self, ids: np.ndarray, tasks: list[str]) -> np.ndarray:
        return self.model.logits(ids, task=tasks)


class Peft:
    """PEFT + PyTorch: fp16 with sdpa attention on a GPU (fp32 on the CPU, where fp16 is not what anyone runs);
    every task's adapter in one PeftModel, one task per batch (prompt tuning takes no mixed batches)."""

    def __init__(self, model_dir: Path, adapters: list[tuple[str, Path]], device: str):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.torch, self.device = torch, device
        self.dtype = torch.float16 if device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, attn_implementation="sdpa")
        base = base.to(device).eval()
        (first, path), *rest = adapters
        self.model = PeftModel.from_pretrained(base, path, adapter_name=first).eval()
        for name, path in rest:
            self.model.load_adapter(path, adapter_name=name)
        self.model.to(device)

    def _ids(self, ids: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)

    def generate(self, ids: np.ndarray, tasks: list[str], new_tokens: int) -> np.ndarray:
        if len(set(tasks)) != 1:
            raise ValueError("PEFT serves one prompt-tuning task per batch")
        self.model.set_adapter(tasks[0])
        with self.torch.inference_mode():
            x = self._ids(ids)
            out = self.model.generate(input_ids=x, attention_mask=self.torch.ones_like(x), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, -new_tokens:].cpu().numpy()

    def logits(self, ids: np.ndarray, tasks: list[str]) -> np.ndarray:
        self.model.set_adapter(tasks[0])
        with self.torch.inference_mode():
            logits = self.model(input_ids=self._ids(ids)).logits[:, -ids.shape[1]:]
        return logits.float().cpu().numpy()

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


class Genai(CpuGenai):
    """onnxruntime-genai on the base model (no prompts: it takes one adapter per generator, and its builder
    writes no prompt bank), built by its own model builder for the device."""

    def __init__(self, build_dir: Path):
        import os

        super().__init__(build_dir, threads=os.cpu_count() or 1)


def genai_with_cuda_graph(build_dir: Path) -> Path:
    """A sibling of genai's build (its files linked, not copied) whose CUDA provider captures the decode step
    as a CUDA graph: what capture buys on this model, which spexport's growing past cannot have yet."""
    target = build_dir.parent / "genai-cuda-graph"
    target.mkdir(exist_ok=True)
    for path in build_dir.iterdir():
        if path.name != "genai_config.json" and not (target / path.name).exists():
            (target / path.name).symlink_to(path.resolve())
    config = json.loads((build_dir / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {}).setdefault("provider_options", [])
    cuda = next((entry["cuda"] for entry in options if "cuda" in entry), None)
    if cuda is None:
        options.append({"cuda": {}})
        cuda = options[-1]["cuda"]
    cuda["enable_cuda_graph"] = "1"
    (target / "genai_config.json").write_text(json.dumps(config, indent=2))
    return target


def build_genai(model_dir: Path, out: Path, cache: Path, device: str, log) -> tuple[Path | None, str]:
    """onnxruntime-genai's model builder: fp16 for CUDA, fp32 for the CPU; (folder, '') or (None, why not)."""
    if (out / "genai_config.json").is_file():
        return out, ""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        return None, f"onnxruntime-genai is not importable here ({e})"
    precision, provider = ("fp16", "cuda") if device == "cuda" else ("fp32", "cpu")
    log(f"  onnxruntime-genai builder -p {precision} -e {provider}")
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
                           "-o", str(out), "-p", precision, "-e", provider, "-c", str(cache)],
                          capture_output=True, text=True)
    if done.returncode or not (out / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()
        return None, "onnxruntime-genai's model builder failed: " + (tail[-1] if tail else f"exit {done.returncode}")
    return out, ""


def host_work_ms(batch: int, vocab: int, reps: int = 20) -> dict:
    """What a step costs on the host once its float32 logits [batch, vocab] are there: the finite check and
    a greedy argmax (numpy), the share an ArgMax inside the graph would save besides the copy itself."""
    logits = np.random.default_rng(0).standard_normal((batch, vocab)).astype(np.float32)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.isfinite(logits.sum())
        logits.argmax(axis=-1)
        times.append(time.perf_counter() - start)
    return {"logits_bytes": logits.nbytes, "check_and_argmax_ms": float(np.median(times)) * 1e3}


def placement(artifact: Path, device: str) -> dict:
    """Which provider ran each node of a short generation (ONNX Runtime's profile): node counts and time per
    provider, and the operator types that ran on the CPU, where a GPU run wants none of the heavy ones."""
    import onnxruntime as ort

    from spexport.runtime import load, session

    plain = session.session_options

    def profiled() -> ort.SessionOptions:
        options = plain()
        options.enable_profiling = True
        options.profile_file_prefix = "/tmp/spexport-gpu-profile"
        return options

    session.session_options = profiled
    try:
        model = load(artifact, providers=PROVIDERS[device])
    finally:
        session.session_options = plain
    model.generate(np.arange(3, 19)[None], task=model.tasks[0], max_new_tokens=4)
    events = json.loads(Path(model.session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    providers, micros, on_cpu = Counter(), Counter(), Counter()
    for event in nodes:
        provider = event.get("args", {}).get("provider", "?")
        providers[provider] += 1
        micros[provider] += int(event.get("dur", 0))
        if provider == "CPUExecutionProvider":
            on_cpu[event.get("args", {}).get("op_name", "?")] += 1
    return {"node_runs": dict(providers), "microseconds": dict(micros), "ops_on_cpu": dict(on_cpu)}


def device_bandwidth(device: str) -> tuple[str, float | None]:
    """(device name, bytes/s a 1 GiB device-to-device copy moves, counting reads and writes); the CPU: None."""
    if device != "cuda":
        return "cpu", None
    import torch

    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return torch.cuda.get_device_name(), 2 * a.numel() * 2 / float(np.median(times))


def gpu_facts(device: str) -> dict:
    if device != "cuda":
        return {}
    import torch

    facts = {"name": torch.cuda.get_device_name(), "torch_cuda": torch.version.cuda,
             "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                           "--format=csv,noheader"], capture_output=True, text=True)
    facts["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return facts
