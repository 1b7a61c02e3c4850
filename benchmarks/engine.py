"""The serving engine on SmolLM2-135M-Instruct fp32: what shared-prefix reuse saves in TTFT, and what
prompt-lookup drafting does to tokens/s where the answer copies from the prompt and where it does not.

    nice -n 10 python -m benchmarks.engine [--work DIR] [--out benchmarks/results] [--reps 3]

Builds once into --work (default under the test cache): one prompt-tuning task initialised from text and
spexport's artifact of it. Then, cases interleaved in each repetition:
- TTFT of a request whose 200-token system prompt another request of the task has already run (prefix
  cache warm), against the same request on an engine without a prefix cache;
- greedy tokens/s with `prompt_lookup_num_tokens` against without, on a copying prompt (repeat a passage)
  and an open one (a story), checking the tokens are identical.
Writes engine.json and engine.md into --out (git commit, package versions and machine recorded).
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

from benchmarks.environment import environment

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = ("You are the support assistant of Northwind Outfitters, a shop for hiking and camping gear. Answer "
          "customers politely and briefly. Orders ship within two business days from our warehouse in Denver; "
          "standard shipping takes three to five days, express one to two. Returns are free within 30 days if "
          "the item is unused and in its box; refunds reach the card in five to seven days. Tents carry a "
          "two-year warranty, boots one year against defects but not wear. We never share customer data. If a "
          "question is about something else, say you can only help with Northwind orders and products. "
          "Opening hours: Monday to Friday, 8 am to 6 pm Mountain Time; weekends by email only. Gift cards "
          "never expire and can be used online or in our Boulder store. Price matching applies to identical items "
          "sold by authorised dealers within 14 days of purchase. For a damaged parcel, ask the customer for a "
          "photo of the box and the item, then open a claim with the carrier on their behalf.")
QUESTIONS = ["Where is my order 4471?", "Can I return boots I wore once?", "Do you ship to Canada?",
             "How long is the tent warranty?", "Are you open on Sunday?", "How fast is express shipping?"]
PASSAGE = ("The Denver warehouse opened in 2009 with four employees and a single loading dock. By 2015 it had "
           "grown to forty employees, three loading docks and an automated sorting line that handles up to "
           "twelve thousand parcels a day. Every parcel is weighed twice, once when it is packed and once "
           "before it leaves, so that a missing item is caught before the truck departs.")
COPY = f"Repeat the following text exactly, word for word.\n\n{PASSAGE}"
OPEN = "Write a short story about a dragon who is afraid of the dark."


def build(work: Path) -> Path:
    """One prompt-tuning task (8 virtual tokens, initialised from text) and its fp32 artifact, built once."""
    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints

    model_dir = checkpoints.smollm2()
    artifact, adapter = work / "artifact", work / "support"
    if (artifact / "spexport.json").is_file():
        return artifact
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text="Answer as a helpful support agent.", num_virtual_tokens=8,
                                tokenizer_name_or_path=str(model_dir))
    get_peft_model(base, config).save_pretrained(adapter)
    subprocess.run([sys.executable, "-m", "spexport.cli", "convert", "--model", str(model_dir), "--adapter",
                    f"support={adapter}", "--output", str(artifact), "--overwrite", "--quiet"], check=True)
    return artifact


def first_token_s(engine, ids: list[int]) -> float:
    start = time.perf_counter()
    request = engine.submit(ids, "support", max_new_tokens=1)
    request.collect()
    return time.perf_counter() - start


def prefix_case(model, reps: int) -> dict:
    from spexport.runtime.engine import Engine

    chat = [model.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in QUESTIONS]
    shared = len(os.path.commonprefix(chat))
    cold, warm = Engine(model, prefix_cache_bytes=0, background=False), Engine(model, background=False)
    first_token_s(warm, chat[0])  # another request of the task ran the system prompt before
    runs = {"uncached": [], "cached": []}
    for rep in range(reps):
        for i, ids in enumerate(chat[1:]):
            cases = [("uncached", cold), ("cached", warm)]
            for name, engine in cases if (rep + i) % 2 == 0 else cases[::-1]:
                runs[name].append(first_token_s(engine, ids))
    ratios = [c / u for c, u in zip(runs["cached"], runs["uncached"])]
    result_runs = {"paired_ratios": ratios}
    same = all(warm.submit(ids, "support", max_new_tokens=24).collect().tokens
               == cold.submit(ids, "support", max_new_tokens=24).collect().tokens for ids in chat[1:3])
    return {"shared_prompt_tokens": shared, "prompt_tokens": [len(c) for c in chat],
            "ttft_uncached_s": float(np.median(runs["uncached"])), "ttft_cached_s": float(np.median(runs["cached"])),
            "ttft_ratio_cached_over_uncached": float(np.median(ratios)), "identical_tokens": same,
            "cache_hits": warm.cache.hits, **result_runs}


def lookup_case(model, reps: int, draft: int, new_tokens: int) -> dict:
    """Plain greedy `generate` against the same request with drafting (the engine `generate` uses for
    prompt_lookup_num_tokens, called directly for its draft counts)."""
    from spexport.runtime.engine import Engine

    out = {}
    for name, text in [("copying", COPY), ("open", OPEN)]:
        ids = np.array([model.apply_chat_template([{"role": "user", "content": text}])])
        runs = {"plain": [], "lookup": []}
        tokens, usage = {}, {}
        for rep in range(reps):
            for case in ["plain", "lookup"] if rep % 2 == 0 else ["lookup", "plain"]:
                start = time.perf_counter()
                if case == "plain":
                    tokens[case] = model.generate(ids, task="support", max_new_tokens=new_tokens)[0, ids.shape[1]:]
                else:
                    answer = Engine(model, prefix_cache_bytes=0, background=False).submit(
                        ids[0], "support", new_tokens, prompt_lookup_num_tokens=draft).collect()
                    tokens[case], usage = answer.tokens, answer.usage
                elapsed = time.perf_counter() - start
                tokens[case] = list(tokens[case])
                runs[case].append(len(tokens[case]) / elapsed)
        ratios = [lk / pl for lk, pl in zip(runs["lookup"], runs["plain"])]
        out[name] = {"prompt_tokens": int(ids.shape[1]), "new_tokens": len(tokens["plain"]),
                     "tokens_per_s_plain": float(np.median(runs["plain"])),
                     "tokens_per_s_lookup": float(np.median(runs["lookup"])),
                     "speedup": float(np.median(ratios)), "identical_tokens": tokens["plain"] == tokens["lookup"],
                     "paired_ratios": ratios, "draft_tokens": usage.get("draft_tokens"),
                     "accepted_draft_tokens": usage.get("accepted_draft_tokens"),
                     "reply_start": model.text_codec().decode(tokens["plain"])[:120]}
    return out


def markdown(result: dict) -> str:
    p, lk, env = result["prefix_reuse"], result["prompt_lookup"], result["environment"]
    copying, open_chat, ratio = lk["copying"], lk["open"], p["ttft_ratio_cached_over_uncached"]
    rows = [("prefix reuse: TTFT cached / uncached", ratio, "<= 0.3", ratio <= 0.3),
            ("prompt lookup: tokens/s on a copying prompt", copying["speedup"], ">= 1.5", copying["speedup"] >= 1.5),
            ("prompt lookup: tokens/s on open chat", open_chat["speedup"], ">= 0.95", open_chat["speedup"] >= 0.95)]
    lines = [f"Engine benchmark, SmolLM2-135M-Instruct fp32, commit {env['git_commit']}, {env['cpu']}, "
             f"{env['cpus']} CPUs, load average {env['load_average_at_start'][0]:.1f} at start; median of "
             f"{result['reps']} interleaved repetitions, ratios taken pair by pair.", "",
             "| target | measured | limit | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {value:.2f}x | {limit} | {'yes' if met else '**no**'} |" for name, value, limit, met in rows]
    lines += ["", f"Prefix: {p['shared_prompt_tokens']} shared tokens of {p['prompt_tokens'][0]}; TTFT "
              f"{p['ttft_uncached_s'] * 1e3:.0f} ms uncached, {p['ttft_cached_s'] * 1e3:.0f} ms cached (medians); "
              f"identical tokens: {p['identical_tokens']}."]
    for name, case in [("copying", copying), ("open", open_chat)]:
        lines.append(f"Prompt lookup, {name} ({result['draft_tokens']} draft tokens): "
                     f"{case['tokens_per_s_plain']:.1f} -> {case['tokens_per_s_lookup']:.1f} tokens/s (medians); "
                     f"identical tokens: {case['identical_tokens']}; drafts accepted: "
                     f"{case['accepted_draft_tokens']} of {case['draft_tokens']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get(
        "SPEXPORT_TEST_CACHE", Path.home() / ".cache" / "spexport-tests")) / "engine-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--draft", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    from spexport.runtime import load

    result = {"environment": environment(), "reps": args.reps, "draft_tokens": args.draft}
    model = load(build(args.work))
    start = time.perf_counter()
    result["prefix_reuse"] = prefix_case(model, args.reps)
    result["prompt_lookup"] = lookup_case(model, args.reps, args.draft, args.new_tokens)
    result["wall_s"] = time.perf_counter() - start
    result["environment"]["load_average_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(result, indent=2))
    (args.out / "engine.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
