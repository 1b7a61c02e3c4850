"""Serving an encoder artifact: classifier logits and labels for many tasks in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spexport.artifact.integrity import inside_folder
from spexport.artifact.manifest import Manifest
from spexport.artifact.ports import (
    KV_PREFIX,
    PREFIX_MASK,
    PROMPT_EMBEDS,
    PROMPT_MASK,
    TOKEN_TYPE_IDS,
    stack_prefixes,
)
from spexport.errors import ArtifactError, InputError
from spexport.families import ENCODER
from spexport.runtime import inputs
from spexport.runtime.base import EMBEDDINGS, KV, Batch, ServedArtifact, finite_logits, prompt_kind
from spexport.runtime.session import load_bank, open_session

SEQUENCE, TOKEN = "sequence", "token"


class EncoderModel(ServedArtifact):
    """A frozen encoder, a bank of per-task prompts (embeddings or KV prefixes) and per-task heads."""

    family = ENCODER
    VERBS = ("logits", "classify")
    DOES = "classifies"

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str],
                 max_batch_size: int = inputs.MAX_BATCH_SIZE):
        super().__init__(folder, manifest, max_batch_size)
        bank = load_bank(folder, manifest)
        self._prompts = [bank[t.tensor] for t in manifest.tasks]
        self._prompt_kinds = [prompt_kind(folder, t) for t in manifest.tasks]
        heads = [_checked_head(folder, t) for t in manifest.tasks]
        self.kinds = {t.name: head["kind"] for t, head in zip(manifest.tasks, heads)}
        self.labels = {t.name: list(head["labels"]) for t, head in zip(manifest.tasks, heads)}
        self._graph = inside_folder(folder, manifest.graph)
        self.session = open_session(self._graph, providers)
        self.providers = self.session.get_providers()
        self._graph_inputs = {i.name for i in self.session.get_inputs()}
        self._head_graphs = [inside_folder(folder, head["graph"]) for head in heads]
        self._heads = [open_session(graph, providers) for graph in self._head_graphs]

    # -- batching -------------------------------------------------------------------------------

    def _prompt_feeds(self, rows: list[int]) -> dict[str, np.ndarray]:
        """Each row's virtual-token embeddings or KV prefix; a row of the other kind gets masked slots."""
        feeds = {}
        info = self.info
        prompts = [(self._prompts[r], self._prompt_kinds[r]) for r in rows]
        if PROMPT_EMBEDS in self._graph_inputs:
            empty = np.zeros((0, info.hidden_size), np.float32)
            feeds[PROMPT_EMBEDS], feeds[PROMPT_MASK] = stack_prefixes(
                [p if kind == EMBEDDINGS else empty for p, kind in prompts], axis=0, min_slots=1)
        if KV_PREFIX in self._graph_inputs:
            empty = np.zeros((info.num_layers, 2, info.num_kv_heads, 0, info.head_dim), np.float32)
            feeds[KV_PREFIX], feeds[PREFIX_MASK] = stack_prefixes(
                [p if kind == KV else empty for p, kind in prompts], axis=3, min_slots=1)
        return feeds

    def _token_types(self, token_type_ids, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """The graph's token_type_ids feed. A body without token types (RoBERTa, DistilBERT) has no such
        input and tells the texts of a pair apart by their separator alone, as in transformers."""
        types = np.zeros(shape, np.int64) if token_type_ids is None else inputs.as_token_types(token_type_ids, shape)
        return {TOKEN_TYPE_IDS: types} if TOKEN_TYPE_IDS in self._graph_inputs else {}

    def _head_kind(self, rows: list[int]) -> str:
        """The batch's kind of classification: SEQUENCE or TOKEN, never both."""
        kinds = {self.kinds[self.tasks[r]] for r in rows}
        if len(kinds) > 1:
            raise InputError("a batch mixes sequence and token classification tasks; send them as separate batches")
        return kinds.pop()

    # -- public verbs ---------------------------------------------------------------------------

    def logits(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
               token_type_ids=None) -> np.ndarray:
        """Each row's logits from its task's head: [batch, num_labels] for sequence classification,
        [batch, seq, num_labels] for token classification (the caller's tokens only).

        token_type_ids: which text of a sentence pair each token belongs to (0 or 1), as the tokenizer
        gives them; default all 0. Rows of tasks with fewer labels than the batch's widest are padded
        with -inf, which softmax and argmax ignore.
        """
        return self._logits(self._prepare(input_ids, attention_mask, task, verb="logits"), token_type_ids)

    def _logits(self, batch: Batch, token_type_ids) -> np.ndarray:
        ids, mask, rows = batch.ids, batch.mask, batch.rows
        kind = self._head_kind(rows)
        names = [o.name for o in self.session.get_outputs()]
        feeds = {"input_ids": ids, "attention_mask": mask, **self._token_types(token_type_ids, ids.shape),
                 **self._prompt_feeds(rows)}
        body = dict(zip(names, self._run(self.session, self._graph, None, feeds)))
        rows = np.array(rows)
        widest = max(len(self.labels[self.tasks[r]]) for r in rows)
        out = np.full(ids.shape[:1] + (ids.shape[1:] if kind == TOKEN else ()) + (widest,), -np.inf, np.float32)
        for task_id in np.unique(rows):
            picked = rows == task_id
            head = self._heads[task_id]
            feeds = {i.name: body[i.name][picked] for i in head.get_inputs()}
            logits = self._run(head, self._head_graphs[task_id], None, feeds)[0]
            real = mask[picked] if logits.ndim == 3 else None  # token logits: the caller's padding may hold anything
            out[picked, ..., :logits.shape[-1]] = finite_logits(logits, self._head_graphs[task_id], real)
        return out

    def classify(self, texts, task: str | Sequence[str] = None, truncation: bool = False) -> list:
        """Tokenize as transformers' tokenizer does, right-pad, classify: per text what transformers'
        pipelines return.

        texts: a string, a list of them, or sentence pairs as (text, text_pair) tuples or {"text": ...,
        "text_pair": ...} dicts, encoded as the tokenizer encodes pairs. truncation: cut a text too long
        for the model's positions (the longer text of a pair first) instead of refusing it.
        Sequence classification: {"label", "score"} per text (softmax, or sigmoid for one label).
        Token classification: per text a list of {"entity", "score", "index", "word", "start", "end"}
        for its tokens, special tokens and the label "O" left out.
        """
        encoded, ids, mask, types = self._encode_texts(texts, task, truncation, pairs=True)
        batch = self._prepare(ids, mask, task)
        owners = np.arange(len(batch.ids)) if batch.owners is None else batch.owners
        logits = self._logits(batch, types[owners])
        names = [batch.table.names[r] for r in batch.rows]  # each run row's task
        results = []
        for row, e in enumerate(encoded):
            members = np.flatnonzero(owners == row)
            if len(members) > 1:
                results.append(_ensemble_answer([names[m] for m in members], logits[members],
                                                self.labels[names[members[0]]]))
                continue
            labels = self.labels[names[members[0]]]
            scores = _scores(logits[members[0], ..., :len(labels)])
            if logits.ndim == 2:
                best = int(scores.argmax())
                results.append({"label": labels[best], "score": float(scores[best])})
                continue
            entities = []
            for index, (token, special, (start, end)) in enumerate(zip(e.tokens, e.special_tokens_mask, e.offsets)):
                best = int(scores[index].argmax())
                if not special and labels[best] != "O":
                    entities.append({"entity": labels[best], "score": float(scores[index, best]), "index": index,
                                     "word": token, "start": start, "end": end})
            results.append(entities)
        return results


def _ensemble_answer(members: list[str], logits: np.ndarray, labels: list[str]) -> dict:
    """An ensemble's answer: the label of the highest mean probability over its members, that mean, and each
    member's own answer as it gives it alone."""
    scores = _scores(logits[:, :len(labels)])
    mean = scores.mean(axis=0)
    best = int(mean.argmax())
    return {"label": labels[best], "score": float(mean[best]),
            "members": [{"task": task, "label": labels[int(s.argmax())], "score": float(s.max())}
                        for task, s in zip(members, scores)]}


def _scores(logits: np.ndarray) -> np.ndarray:
    """Softmax over the labels, or a sigmoid when there is one label (transformers' pipelines)."""
    logits = logits.astype(np.float64)
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _checked_head(folder: Path, task) -> dict:
    head = task.head
    if not isinstance(head, dict) or head.get("kind") not in (SEQUENCE, TOKEN) \
            or not isinstance(head.get("graph"), str) or not isinstance(head.get("labels"), list) \
            or not head["labels"] or not all(isinstance(label, str) for label in head["labels"]):
        raise ArtifactError(f"{folder}: task {task.name!r} has no valid head (graph, kind, labels) in the manifest")
    return head
