"""The comparators, each behind one verb: greedy-generate `new_tokens` tokens for a batch of rows.

Every engine gets the same token ids and the same number of threads, and none stops early (the
benchmark models have no EOS). `generate` returns the new tokens [batch, new_tokens].
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


class Spexport:
    """spexport's torch-free runtime on an artifact; rows may each have their own task."""

    def __init__(self, artifact: Path, name: str = "spexport"):
        from spexport.runtime import load

        self.name = name
        self.model = load(artifact)

    def generate(self, ids: np.ndarray, tasks: list[str], new_tokens: int) -> np.ndarray:
        out = self.model.generate(ids, task=tasks, max_new_tokens=new_tokens)
        return out[:, ids.shape[1]:]

    def logits(self, ids: np.ndarray, tasks: list[str]) -> np.ndarray:
        return self.model.logits(ids, task=tasks)


class Peft:
    """PEFT + PyTorch, eager, CPU: every task's adapter loaded into one PeftModel, one task per batch."""

    def __init__(self, model_dir: Path, adapters: list[tuple[str, Path]], threads: int):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.name = "peft+pytorch"
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        base.generation_config.pad_token_id = 0  # silences generate's warning; no row is padded
        (first, path), *rest = adapters
        self.model = PeftModel.from_pretrained(base, path, adapter_name=first).eval()
        for name, path in rest:
            self.model.load_adapter(path, adapter_name=name)

    def switch(self, task: str) -> None:
        self.model.set_adapter(task)

    def generate(self, ids: np.ndarray, tasks: list[str], new_tokens: int) -> np.ndarray:
        if len(set(tasks)) != 1:
            raise ValueError("PEFT serves one prompt-tuning task per batch")
        self.switch(tasks[0])
        with self.torch.inference_mode():
            x = self.torch.from_numpy(ids)
            out = self.model.generate(input_ids=x, attention_mask=self.torch.ones_like(x), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[:, -new_tokens:].numpy()

    def logits(self, ids: np.ndarray, tasks: list[str]) -> np.ndarray:
        self.switch(tasks[0])
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.from_numpy(ids)).logits[:, -ids.shape[1]:].numpy()


class OrtBaseline:
    """optimum-onnx's ORTModelForCausalLM on the plain base model (no prompts): the ONNX Runtime baseline."""

    def __init__(self, export_dir: Path, threads: int):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        self.torch = torch
        self.name = "optimum-ort (base model)"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.model = ORTModelForCausalLM.from_pretrained(export_dir, session_options=options, use_cache=True,
                                                         local_files_only=True)
        self.model.generation_config.pad_token_id = 0

    def generate(self, ids: np.ndarray, tasks: list[str], new_tokens: int) -> np.ndarray:
        x = self.torch.from_numpy(ids)
        out = self.model.generate(input_ids=x, attention_mask=self.torch.ones_like(x), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[:, -new_tokens:].numpy()


class Genai:
    """onnxruntime-genai on the base model (no prompts), built by its own model builder."""

    def __init__(self, build_dir: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        self.name = "onnxruntime-genai (base model)"
        config_path = build_dir / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        model = config["model"]
        if model.get("eos_token_id") is None:  # the benchmark models have no EOS; genai needs a number
            model["eos_token_id"] = model["vocab_size"] - 1  # min_length keeps it from ending a row early
        if model.get("pad_token_id") is None:
            model["pad_token_id"] = 0
        config_path.write_text(json.dumps(config, indent=2))
        self.model = og.Model(str(build_dir))

    def generate(self, ids: np.ndarray, tasks: list[str], new_tokens: int) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + new_tokens, batch_size=len(ids), do_sample=False,
                                  min_length=ids.shape[1] + new_tokens)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))
        out = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(generator.get_next_tokens().copy())
        return np.stack(out, axis=1)[:, :new_tokens]


def build_genai(model_dir: Path, out: Path, cache: Path, precision: str = "fp32") -> tuple[Path | None, str]:
    """Run onnxruntime-genai's model builder (`precision`: fp32 or int4, CPU); returns (folder, '') or
    (None, why not)."""
    import subprocess
    import sys

    if (out / "genai_config.json").is_file():
        return out, ""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None, "onnxruntime-genai is not installed (pip install -e '.[bench]')"
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
                           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)],
                          capture_output=True, text=True)
    if done.returncode or not (out / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()
        return None, "onnxruntime-genai's model builder failed: " + (tail[-1] if tail else f"exit {done.returncode}")
    return out, ""


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result
