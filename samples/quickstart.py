"""spexport end to end in one command, offline, in well under a minute on two CPU cores.

    python samples/quickstart.py [--out ./quickstart-out]

1. build a tiny random Llama (GQA) and a BPE tokenizer, save them like any Hugging Face model;
2. train two real PEFT prompt-tuning adapters on toy tasks: "shout" answers any prompt with
   "HEY LISTEN UP", "count" with "one two three four" (only the 8 virtual tokens learn);
3. `spexport convert` both into ONE artifact;
4. serve a mixed-task, left-padded batch with `spexport.runtime` in a process where torch,
   transformers, peft and optimum cannot even be imported;
5. check it against PeftModel: logits within 1e-4, identical greedy tokens (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ("the cat sat on a mat dog ran in park red green blue sun moon tree house big small old new fast slow"
         .split())
ANSWERS = {"shout": "HEY LISTEN UP", "count": "one two three four"}
PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
N_VIRTUAL = 8
TRAIN_STEPS = 300
MAX_NEW_TOKENS = 8
ATOL = 1e-4
# The same prompt under both tasks, then prompts of other lengths: one batch, left-padded.
BATCH = [("shout", "the cat sat on a mat"), ("count", "the cat sat on a mat"), ("count", "red sun"),
         ("shout", "big old tree house"), ("count", "a dog ran in the park"), ("shout", "moon")]
BLOCKED = ("torch", "transformers", "peft", "optimum", "safetensors")

console = Console()


# -- 1. a tiny model and tokenizer --------------------------------------------------------------

def build_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    corpus = [" ".join(WORDS), *ANSWERS.values()] * 10  # every word becomes one token
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    # initializer_range 0.2, not the usual 0.02: a random model that small has nearly flat logits
    # that no prompt can sharpen; larger weights give it strong random preferences to steer.
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=0.2,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    LlamaForCausalLM(config).save_pretrained(folder)


# -- 2. two prompt-tuning adapters --------------------------------------------------------------

def train_adapter(model_dir: Path, task: str, out: Path, seed: int, progress: Progress) -> tuple[float, float]:
    """Teach N_VIRTUAL soft tokens to make the frozen model answer ANSWERS[task]; return first/last loss."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL))
    optimizer = torch.optim.Adam(model.prompt_encoder.parameters(), lr=0.3)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    word_ids = torch.tensor(tokenizer.encode(" ".join(WORDS)).ids)
    answer = torch.tensor(tokenizer.encode(ANSWERS[task]).ids + [EOS])
    bar = progress.add_task(f"training {task}", total=TRAIN_STEPS)
    losses = []
    for step in range(TRAIN_STEPS):
        length = int(torch.randint(1, 8, ()))  # a batch of random word salads of one length
        prompts = word_ids[torch.randint(len(word_ids), (16, length))]
        ids = torch.cat([prompts, answer.expand(16, -1)], dim=1)
        labels = ids.clone()
        labels[:, :length] = -100  # learn the answer only, whatever the prompt
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 75 == 0 or step == TRAIN_STEPS - 1:
            progress.console.print(f"  {task:5s} step {step:3d}  loss {loss.item():.3f}")
        progress.update(bar, advance=1, description=f"training {task} (loss {loss.item():.2f})")
    model.save_pretrained(out)
    return losses[0], losses[-1]


# -- 3. one artifact ----------------------------------------------------------------------------

def export(model_dir: Path, adapters: dict[str, Path], artifact: Path) -> None:
    from spexport.export import convert

    with _progress() as progress:
        bar = progress.add_task("exporting", total=None)
        convert(model_dir, list(adapters.items()), artifact, overwrite=True,
                on_step=lambda step: progress.update(bar, description=step))
        progress.update(bar, description="exported", total=1, completed=1)


# -- 4. serving without torch -------------------------------------------------------------------

def serve(artifact: str, results: str) -> None:
    """Runs in a process where the blocked packages cannot be imported (see `serve_torch_free`)."""
    from spexport.runtime import load

    model = load(artifact)
    encoded = [model.tokenizer.encode(text).ids for _, text in BATCH]
    width = max(map(len, encoded))
    ids = np.array([[PAD] * (width - len(e)) + e for e in encoded], np.int64)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], np.int64)
    tasks = [task for task, _ in BATCH]
    logits = model.logits(ids, mask, task=tasks)
    tokens = model.generate(ids, mask, task=tasks, max_new_tokens=MAX_NEW_TOKENS)

    console.print(f"  blocked here: {', '.join(BLOCKED)} (loaded: "
                  f"{', '.join(n for n in BLOCKED if sys.modules.get(n)) or 'none'})")
    table = Table("task", "prompt", "generated", title="one left-padded batch, two tasks")
    for (task, text), row in zip(BATCH, tokens):
        table.add_row(task, text, model.tokenizer.decode(row[width:].tolist(), skip_special_tokens=True))
    console.print(table)
    np.savez(results, ids=ids, mask=mask, logits=logits, tokens=tokens)


def serve_torch_free(artifact: Path, results: Path) -> None:
    script = "\n".join([
        "import sys",
        f"for name in {BLOCKED!r}:",
        "    sys.modules[name] = None  # any import of these now raises ImportError",
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})",
        "import quickstart",
        "quickstart.serve(sys.argv[1], sys.argv[2])",
    ])
    subprocess.run([sys.executable, "-c", script, str(artifact), str(results)], check=True)


# -- 5. parity with PEFT ------------------------------------------------------------------------

def until_eos(tokens: np.ndarray) -> list[int]:
    tokens = tokens.tolist()
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def check_parity(model_dir: Path, adapters: dict[str, Path], results: Path) -> bool:
    """Compare every row of the served batch with PeftModel run on that row alone, unpadded."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from spexport.validate import peft_greedy

    served = np.load(results)
    width = served["ids"].shape[1]
    table = Table("task", "max |logits - PeftModel|", "greedy tokens vs PeftModel", "")
    ok = True
    for task, adapter in adapters.items():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
        worst, same = 0.0, True
        for i, (row_task, _) in enumerate(BATCH):
            if row_task != task:
                continue
            n = int(served["mask"][i].sum())
            row = torch.from_numpy(served["ids"][i, width - n:][None])
            with torch.no_grad():
                logits = reference(input_ids=row).logits[0, -n:].numpy()  # PEFT adds virtual positions
            # greedy over PEFT's forward: PeftModel.generate misplaces the prompt under transformers 5
            expected = peft_greedy(reference, row.numpy(), MAX_NEW_TOKENS, [EOS])[0, n:]
            worst = max(worst, float(np.abs(served["logits"][i, width - n:] - logits).max()))
            same &= until_eos(served["tokens"][i, width:]) == until_eos(expected)
        passed = worst <= ATOL and same
        ok &= passed
        table.add_row(task, f"{worst:.1e}", "identical" if same else "DIFFERENT",
                      "[green]ok[/]" if passed else "[bold red]FAIL[/]")
    console.print(table)
    return ok


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=console)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("quickstart-out"), help="work folder (default %(default)s)")
    out = parser.parse_args().out.resolve()
    import torch

    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and every run repeats exactly
    started = time.perf_counter()
    model_dir, artifact, results = out / "tiny-llama", out / "artifact", out / "served.npz"
    adapters = {task: out / f"pt-{task}" for task in ANSWERS}

    console.rule("1. a tiny random Llama (4 layers, GQA) and a BPE tokenizer")
    build_model(model_dir)
    console.print(f"  saved to {model_dir}")
    console.rule(f"2. training two prompt-tuning adapters ({N_VIRTUAL} virtual tokens, frozen model)")
    with _progress() as progress:
        for seed, (task, folder) in enumerate(adapters.items(), start=1):
            first, last = train_adapter(model_dir, task, folder, seed, progress)
            progress.console.print(f"  {task}: loss {first:.2f} -> {last:.2f}, saved to {folder}")
    console.rule("3. spexport convert: both adapters, one ONNX artifact")
    export(model_dir, adapters, artifact)
    manifest = json.loads((artifact / "spexport.json").read_text())
    console.print(f"  {artifact}, tasks: {', '.join(t['name'] for t in manifest['tasks'])}")
    console.print(f"  files: {', '.join(sorted(p.name for p in artifact.iterdir()))}")
    console.rule("4. spexport.runtime in a fresh process without torch")
    serve_torch_free(artifact, results)
    console.rule("5. parity against PEFT (each row alone, unpadded, in PyTorch)")
    ok = check_parity(model_dir, adapters, results)
    console.print(f"done in {time.perf_counter() - started:.0f} s; parity {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
