"""New decoder tasks without torch: an adapter read by the converters, its embeddings run through the
artifact's prefix graph (docs/artifact-format.md) into the KV prefix `spexport convert` would store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from spexport.artifact.integrity import inside_folder
from spexport.artifact.manifest import Manifest, Task
from spexport.artifact.ports import INPUTS_EMBEDS, KV_PREFIX, PREFIX_MASK, PRESENT_KEY, PRESENT_VALUE
from spexport.converters import parse_adapters
from spexport.converters.bank import adapter_prompts, bank_entry
from spexport.errors import ArtifactError
from spexport.families import Family, family_named
from spexport.runtime.base import running
from spexport.runtime.session import open_session, unpacked_options


def check_editable(folder: Path, manifest: Manifest) -> Family:
    """The artifact's family; an artifact whose task list cannot change without exporting again is refused in
    one line."""
    family = family_named(manifest.family, folder)
    if not family.takes_added_tasks:
        raise ArtifactError(f"{folder}: {family.why_tasks_are_fixed}; export it again with the new --adapter")
    if manifest.baked:
        raise ArtifactError(f"{folder}: the artifact is baked (its prompts are constants inside model.onnx); "
                            "export it again, or without --bake to add tasks later")
    return family


class PrefixGraph:
    """The artifact's prefix graph in an ONNX Runtime session: virtual-token embeddings in, KV prefix out."""

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str] | None = None):
        if manifest.prefix_graph is None:
            raise ArtifactError(f"{folder}: the artifact has no prefix graph (exported before spexport could add "
                                "tasks); export it again to add tasks that hold embeddings")
        self.info = manifest.model
        self.path = inside_folder(folder, manifest.prefix_graph)
        # one run over a few tokens: optimizing the graph would cost more than it saves, as packing would
        options = unpacked_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = open_session(self.path, providers or ["CPUExecutionProvider"], options)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def kv(self, embeddings: np.ndarray) -> np.ndarray:
        """[layers, 2, kv_heads, n, head_dim] of virtual tokens with `embeddings` [n, hidden] at positions 0..n-1."""
        info, n = self.info, len(embeddings)
        empty = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
        feeds = {INPUTS_EMBEDS: np.ascontiguousarray(embeddings[None], np.float32),
                 "input_ids": np.zeros((1, n), np.int64),  # where a graph still reads its shape (GPT-2 unfused)
                 "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n, dtype=np.int64)[None],
                 KV_PREFIX: np.zeros((1, info.num_layers, 2, info.num_kv_heads, 0, info.head_dim), np.float32),
                 PREFIX_MASK: np.zeros((1, 0), np.int64)}
        for layer in range(info.num_layers):
            feeds[f"past_key_values.{layer}.key"] = feeds[f"past_key_values.{layer}.value"] = empty
        names = [n.format(layer) for layer in range(info.num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]
        with running(self.path):
            present = self.session.run(names, {k: v for k, v in feeds.items() if k in self.inputs})
        return np.stack([np.stack([present[2 * i][0], present[2 * i + 1][0]]) for i in range(info.num_layers)])


def new_tasks(folder: Path, manifest: Manifest, adapters: list[tuple[str, Path]],
              providers: list[str] | None = None) -> list[tuple[Task, np.ndarray]]:
    """Each task the adapters yield, as a manifest Task and its bank tensor, in the order given: a decoder's
    KV prefix; a seq2seq task's embeddings or KV prefix as they are (its graphs take both)."""
    family = check_editable(folder, manifest)
    prompts = {task: prompt for _, tasks in adapter_prompts(parse_adapters(adapters), manifest.model, family)
               for task, prompt in tasks.items()}
    # a bank that cannot hold embeddings holds their KV prefix, which the prefix graph computes
    run = not family.embeddings_in_bank and any(p.kind == "embeddings" for p in prompts.values())
    graph = PrefixGraph(folder, manifest, providers) if run else None
    return [bank_entry(name, prompt, graph.kv if run else None) for name, prompt in prompts.items()]
