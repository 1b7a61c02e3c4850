"""Serving a decoder-only artifact: logits and generation for many tasks in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from spexport.artifact.integrity import inside_folder
from spexport.artifact.manifest import Manifest
from spexport.artifact.ports import (
    KV_PREFIX,
    PAST_KEY,
    PAST_VALUE,
    PREFIX_MASK,
    PRESENT_KEY,
    PRESENT_VALUE,
    TASK_IDS,
    stack_prefixes,
)
from spexport.errors import ArtifactError, InputError
from spexport.runtime import inputs, sampling
from spexport.runtime.base import (
    ORT_ERRORS,
    ServedArtifact,
    check_ports,
    first_line,
    load_bank,
    load_tokenizer,
    open_session,
    pick_providers,
    release_freed_memory,
    verify_files,
)
from spexport.runtime.encoder import EncoderModel
from spexport.runtime.seq2seq import Seq2SeqModel


def load(folder: str | Path, providers: list[str] | None = None, verify: bool = True,
         max_batch_size: int = inputs.MAX_BATCH_SIZE) -> DecoderModel | EncoderModel | Seq2SeqModel:
    """Open an artifact folder written by `spexport convert`: a DecoderModel, EncoderModel or Seq2SeqModel.

    providers: ONNX Runtime execution providers in order of preference (default CPU); any that
    this machine lacks is dropped with a warning. verify: check every file's sha256 first (a file
    verified before and not written since is not read again). max_batch_size: the most rows one
    call may send; a larger batch is refused before anything is allocated for it.
    """
    folder = Path(folder)
    manifest = Manifest.read(folder)
    served = {"decoder": DecoderModel, "encoder": EncoderModel, "seq2seq": Seq2SeqModel}
    if manifest.family not in served:
        raise ArtifactError(f"{folder}: family {manifest.family!r} is not served by this spexport")
    if verify:
        verify_files(folder, manifest)
    model = served[manifest.family](folder, manifest, pick_providers(providers), max_batch_size)
    release_freed_memory()
    return model


class DecoderModel(ServedArtifact):
    """A frozen causal LM plus a bank of per-task KV prefixes."""

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str],
                 max_batch_size: int = inputs.MAX_BATCH_SIZE):
        super().__init__(folder, manifest, max_batch_size)
        self._n_virtual = [t.num_virtual_tokens for t in manifest.tasks]
        # a baked graph holds the prompt bank itself and picks each row's prefix by task id
        self._prefixes = None
        if not manifest.baked:
            bank = load_bank(folder, manifest)
            self._prefixes = [bank[t.tensor] for t in manifest.tasks]
        layers = range(self.info.num_layers)
        self._past_names = [n.format(i) for i in layers for n in (PAST_KEY, PAST_VALUE)]
        self._present_names = [n.format(i) for i in layers for n in (PRESENT_KEY, PRESENT_VALUE)]
        self._graph = inside_folder(folder, manifest.graph)
        self.session = open_session(self._graph, providers)
        check_ports(self.session, self._graph, *self._ports())
        self.providers = self.session.get_providers()
        self.tokenizer = load_tokenizer(folder, manifest)

    def _ports(self) -> tuple[dict[str, list], dict[str, list]]:
        """The graph's inputs and outputs as the manifest describes them (None: any size)."""
        info = self.info
        kv = [None, info.num_kv_heads, None, info.head_dim]
        prefix = {TASK_IDS: [None]} if self._prefixes is None else {
            KV_PREFIX: [None, info.num_layers, 2, info.num_kv_heads, None, info.head_dim], PREFIX_MASK: [None, None]}
        tokens = dict.fromkeys(["input_ids", "attention_mask", "position_ids"], [None, None])
        return ({**tokens, **prefix, **dict.fromkeys(self._past_names, kv)},
                {"logits": [None, None, info.vocab_size], **dict.fromkeys(self._present_names, kv)})

    # -- batching -------------------------------------------------------------------------------

    def _prefix(self, rows: list[int]) -> dict[str, np.ndarray]:
        """The graph inputs that select each row's prompt."""
        if self._prefixes is None:
            return {TASK_IDS: np.array(rows, np.int64)}
        kv, mask = stack_prefixes([self._prefixes[r] for r in rows])
        return {KV_PREFIX: kv, PREFIX_MASK: mask}

    def _first_step(self, mask: np.ndarray, rows: list[int]):
        """Generation's first feeds: (prefix inputs, past, attention mask, position ids).

        With a prompt bank, each row's prefix goes in as the past, with its mask ahead of the
        caller's and positions after it, while the graph's own prefix inputs stay empty: what the
        graph would join inside it, the caller joins once. `present` then holds prefix and tokens
        and is passed back as it is, so no later step splits, concatenates or slices off the prefix.
        A baked graph holds its prompts, so it is given task ids and an empty past.
        """
        if self._prefixes is None:
            return self._prefix(rows), self._empty_past(len(rows)), mask, inputs.positions(mask)
        info = self.info
        kv, prefix_mask = stack_prefixes([self._prefixes[r] for r in rows])
        empty = {KV_PREFIX: np.zeros((len(rows), info.num_layers, 2, info.num_kv_heads, 0, info.head_dim),
                                     np.float32), PREFIX_MASK: np.zeros((len(rows), 0), np.int64)}
        past = [np.ascontiguousarray(kv[:, layer, which]) for layer in range(info.num_layers) for which in (0, 1)]
        positions = inputs.positions(mask) + prefix_mask.sum(axis=1, keepdims=True)
        return empty, past, np.concatenate([prefix_mask, mask], axis=1), positions

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.info.num_kv_heads, 0, self.info.head_dim)
        return [np.zeros(shape, np.float32) for _ in self._past_names]

    def _prepare(self, input_ids, attention_mask, task):
        ids = inputs.as_token_matrix(input_ids, self.info.vocab_size, self.max_batch_size)
        mask = inputs.as_mask(attention_mask, ids.shape)
        rows = inputs.task_indices(task, self.tasks, ids.shape[0])
        budget = self.info.max_positions - max(self._n_virtual[r] for r in rows)
        if ids.shape[1] > budget:
            raise InputError(f"input of {ids.shape[1]} tokens is too long: with its task's virtual tokens the "
                             f"model allows {budget} (max positions {self.info.max_positions})")
        return ids, mask, rows

    def _run(self, ids, mask, position_ids, past, prefix) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, **prefix,
                 **dict(zip(self._past_names, past))}
        try:
            outputs = self.session.run(["logits", *self._present_names], feeds)
        except ORT_ERRORS as e:  # inputs are checked first, so the artifact is at fault (or memory ran out)
            raise ArtifactError(f"{self._graph}: ONNX Runtime failed running it ({first_line(e)})") from e
        return outputs[0], outputs[1:]

    # -- public verbs ---------------------------------------------------------------------------

    def logits(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
               decoder_input_ids=None) -> np.ndarray:
        """Logits [batch, seq, vocab] for the caller's tokens (no virtual positions)."""
        if decoder_input_ids is not None:
            raise InputError("decoder_input_ids is for encoder-decoder artifacts; this one is decoder-only")
        ids, mask, rows = self._prepare(input_ids, attention_mask, task)
        logits, _ = self._run(ids, mask, inputs.positions(mask), self._empty_past(len(ids)), self._prefix(rows))
        return logits

    def generate(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> np.ndarray:
        """Input followed by new tokens, as transformers' `generate` returns for a causal LM.

        Rows stop at the model's EOS (later slots hold the pad token), at max_new_tokens, or
        where the model's positions run out.
        """
        inputs.check_generation(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        ids, mask, rows = self._prepare(input_ids, attention_mask, task)
        room = self.info.max_positions - max(self._n_virtual[r] for r in rows) - ids.shape[1]
        eos = np.array(self.info.eos_token_ids, np.int64)
        pad = self.info.pad_token_id if self.info.pad_token_id is not None else (eos[0] if eos.size else 0)
        rng = np.random.default_rng(seed)
        batch, width = ids.shape
        steps = min(max_new_tokens, room)
        sequences = np.empty((batch, width + steps), np.int64)
        sequences[:, :width] = ids
        prefix, past, mask, position_ids = self._first_step(mask, rows)
        bound = _BoundSteps(self, prefix, past)
        step_ids = ids
        unfinished = np.ones(batch, bool)
        done = width
        for step in range(steps):
            logits = bound.run(step_ids, mask, position_ids)
            chosen = sampling.next_tokens(logits, do_sample, temperature, top_k, top_p, rng)
            chosen = np.where(unfinished, chosen, pad).astype(np.int64)
            sequences[:, width + step] = chosen
            done += 1
            unfinished &= ~np.isin(chosen, eos)
            if not unfinished.any():
                break
            step_ids = chosen[:, None]
            position_ids = mask.sum(axis=1, keepdims=True)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        return sequences[:, :done]

    def generate_text(self, texts: str | Sequence[str], task: str | Sequence[str] = None,
                      max_new_tokens: int = 20, **kwargs) -> list[str]:
        """Tokenize, left-pad, generate, and decode each row's new tokens."""
        tokenizer = self._require_tokenizer()
        _, ids, mask = inputs.tokenize(tokenizer, texts, self.info.pad_token_id, left=True)
        out = self.generate(ids, mask, task=task, max_new_tokens=max_new_tokens, **kwargs)
        return [tokenizer.decode(row[ids.shape[1]:].tolist(), skip_special_tokens=True) for row in out]

    def classify(self, texts, task=None):
        raise InputError("classify is for classifier artifacts; this decoder-only artifact generates text")

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(f"{self.folder} has no tokenizer.json; pass token ids instead of text")
        return self.tokenizer


class _BoundSteps:
    """One generation's feeds, bound to the session with IO binding for all of its steps.

    The prefix inputs and the first past are bound once. Each step's `present.*` outputs stay ONNX
    Runtime values and are bound as the next step's `past_key_values.*` (on a GPU provider they
    never leave the device). Logits land in numpy buffers allocated once per shape, so no step
    copies them.
    """

    DEVICES = {"CUDAExecutionProvider": "cuda"}  # where present.* live; anything else: the CPU

    def __init__(self, model: DecoderModel, prefix: dict[str, np.ndarray], past: list[np.ndarray]):
        self.session, self.graph = model.session, model._graph
        self.binding = model.session.io_binding()
        self.device = self.DEVICES.get(model.providers[0], "cpu")
        self.past_names, self.present_names = model._past_names, model._present_names
        self.vocab = model.info.vocab_size
        self.logits: dict[tuple[int, int], np.ndarray] = {}
        for name, value in [*prefix.items(), *zip(self.past_names, past)]:
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))

    def run(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run one step; the logits of each row's last position [batch, vocab]."""
        binding = self.binding
        for name, value in [("input_ids", ids), ("attention_mask", mask), ("position_ids", position_ids)]:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        logits = self.logits.get(ids.shape)
        if logits is None:
            logits = self.logits[ids.shape] = np.empty((*ids.shape, self.vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        try:
            self.session.run_with_iobinding(binding)
        except ORT_ERRORS as e:  # inputs are checked first, so the artifact is at fault (or memory ran out)
            raise ArtifactError(f"{self.graph}: ONNX Runtime failed running it ({first_line(e)})") from e
        for name, value in zip(self.past_names, binding.get_outputs()[1:]):
            binding.bind_ortvalue_input(name, value)
        return logits[:, -1]
