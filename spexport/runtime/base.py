"""What every served artifact shares: its facts and tasks, the checks on a request, running a graph."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spexport.artifact.manifest import Manifest, Task
from spexport.errors import ArtifactError, InputError
from spexport.families import FAMILIES, Family
from spexport.runtime import inputs
from spexport.runtime.session import ORT_ERRORS, first_line
from spexport.runtime.text import TextCodec

EMBEDDINGS, KV = "embeddings", "kv"  # what a task's bank tensor feeds: token embeddings, or keys and values


@contextmanager
def running(graph: Path) -> Iterator[None]:
    """Report ONNX Runtime failing inside the block as the artifact's fault: requests are checked before
    they reach a graph, so what is left is a graph that does not run (or memory that ran out)."""
    try:
        yield
    except ORT_ERRORS as e:
        raise ArtifactError(f"{graph}: ONNX Runtime failed running it ({first_line(e)})") from e


def finite_logits(logits: np.ndarray, graph: Path, real: np.ndarray | None = None) -> np.ndarray:
    """`logits`, or an ArtifactError where they hold NaN or Inf and mean something (`real`: a mask over their
    leading axes, such as the caller's attention mask; padding slots may hold anything). One sum finds
    finite logits, the usual case; only a sum that is not finite looks further."""
    if np.isfinite(logits.sum()):
        return logits
    if np.isfinite(logits[real.astype(bool)] if real is not None else logits).all():
        return logits  # the sum overflowed, or only padding slots are not finite
    raise non_finite_logits(graph)


def non_finite_logits(graph: Path) -> ArtifactError:
    return ArtifactError(f"{graph}: the model computed NaN or Inf logits, so no token can be chosen; its weights "
                         "hold NaN or Inf, or a float16 graph overflowed (export it in float32)")


def prompt_kind(folder: Path, task: Task) -> str:
    """EMBEDDINGS or KV: what `task`'s bank tensor is, as its exporter recorded in `source.kind`."""
    kind = task.source.get("kind")
    if kind is None:
        # manifests from before the record: a bank tensor is [n, hidden] embeddings or a 5-d KV prefix
        kind = EMBEDDINGS if len(task.shape) == 2 else KV
    if (kind, len(task.shape)) not in [(EMBEDDINGS, 2), (KV, 5)]:
        raise ArtifactError(f"{folder}: task {task.name!r} records prompt kind {kind!r} for a tensor of shape "
                            f"{task.shape}; expected embeddings [n, hidden] or kv [layers, 2, heads, n, head_dim]")
    return kind


@dataclass(frozen=True)
class TaskTable:
    """The tasks a model serves, in task id order: never changed, only replaced whole, so a request that
    holds one sees one consistent list while `add_task` / `remove_task` swap in the next."""

    names: tuple[str, ...]
    virtual: tuple[int, ...]  # each task's virtual tokens
    positions: tuple[int, ...]  # of those, the ones that take positions ahead of the caller's tokens
    prompts: tuple | None = None  # a decoder's KV prefixes (None: baked into the graph)


@dataclass(frozen=True, eq=False)
class Batch:
    """A checked request as the graphs run it: token ids and mask [rows, seq] as int64, each row's task id,
    and the task list those ids index (read once, so the request is served with one list to its end).

    A request row that names an ensemble runs one row per member: `owners` [rows] then holds each run
    row's request row (None: one run row per request row)."""

    ids: np.ndarray
    mask: np.ndarray
    rows: list[int]  # each run row's task id in `table`
    table: TaskTable
    owners: np.ndarray | None = None

    @property
    def firsts(self) -> np.ndarray | slice:
        """Where each request row's first run row is (a slice of all rows when there are no ensembles)."""
        return slice(None) if self.owners is None else np.unique(self.owners, return_index=True)[1]


class ServedArtifact:
    """What every served artifact knows: its folder, manifest, model facts and tasks (in task id order).

    A family's class names its `family` record, lists its public verbs in VERBS and says what it does in DOES;
    a verb of another family is a method here that answers with one line naming the verbs this one has.
    """

    family: Family  # the record of the family this class serves
    VERBS: tuple[str, ...] = ()
    DOES = ""
    # padding takes positions, unless a family's graph lays each row out as [virtual tokens, tokens, padding]
    PADDING_TAKES_POSITIONS = True

    def __init__(self, folder: Path, manifest: Manifest, max_batch_size: int):
        self.folder = folder
        self.max_batch_size = max_batch_size
        self.manifest = manifest
        self.info = manifest.model
        virtual = tuple(t.num_virtual_tokens for t in manifest.tasks)
        self._table = TaskTable(tuple(t.name for t in manifest.tasks), virtual, virtual)
        self._ensembles = {name: tuple(members) for name, members in manifest.ensembles.items()}
        self._text = TextCodec.load(folder, manifest.tokenizer_files)
        # the tokenizers library's Tokenizer, its own padding and truncation turned off
        self.tokenizer = None if self._text is None else self._text.tokenizer

    @property
    def tasks(self) -> list[str]:
        """The task names; a task's id is its position here."""
        return list(self._table.names)

    @property
    def ensembles(self) -> dict[str, tuple[str, ...]]:
        """The prompt ensembles: name -> member tasks. A name is taken wherever a task name is, and the
        request runs once per member in one batch (classify: the mean of the members' probabilities;
        generation: each token from the mean of the members' log-probabilities)."""
        return dict(self._ensembles)

    @property
    def num_virtual_tokens(self) -> dict[str, int]:
        """Each task's virtual tokens; for an ensemble, the most of its members' (what bounds its prompts)."""
        virtual = dict(zip(self._table.names, self._table.virtual))
        return virtual | {name: max(virtual[m] for m in members) for name, members in self._ensembles.items()
                          if all(m in virtual for m in members)}

    def _members(self, task, batch: int) -> tuple[str | Sequence[str] | None, np.ndarray | None]:
        """`task` with each ensemble row spread into one row per member, and each row's request row (the
        owners); (task, None) when it names no ensemble."""
        if not self._ensembles or task is None:
            return task, None
        names = [task] * batch if isinstance(task, str) else task
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) \
                or not any(isinstance(n, str) and n in self._ensembles for n in names):
            return task, None
        spread = [(row, member) for row, name in enumerate(names)
                  for member in (self._ensembles.get(name, (name,)) if isinstance(name, str) else (name,))]
        return [member for _, member in spread], np.array([row for row, _ in spread], np.int64)

    def _refuse_ensembles(self, task, verb: str) -> None:
        names = [task] if isinstance(task, str) else task if isinstance(task, (list, tuple)) else []
        name = next((n for n in names if isinstance(n, str) and n in self._ensembles), None)
        if name is not None:
            raise InputError(f"{verb} takes task names; {name!r} is an ensemble of {', '.join(self._ensembles[name])}"
                             f": pass a member, or use {'classify' if self.family.classifies else 'generate'}")

    def _refuse_removing_member(self, task: str) -> None:
        """An ensemble needs its members: InputError naming the first that has `task`."""
        name = next((n for n, members in self._ensembles.items() if task in members), None)
        if name is not None:
            raise InputError(f"task {task!r} is a member of ensemble {name!r} ({', '.join(self._ensembles[name])});"
                             " an ensemble needs its members")

    @property
    def _positions_taken(self) -> tuple[int, ...]:
        """Per task id, the virtual tokens that take positions ahead of the caller's tokens."""
        return self._table.positions

    @_positions_taken.setter
    def _positions_taken(self, positions: list[int]) -> None:
        self._table = replace(self._table, positions=tuple(positions))

    # The verbs of other families: a family's class overrides those it has.
    def generate(self, *args, **kwargs):
        """Token ids in, token ids out (families that generate)."""
        raise self._other_family("generate", generating=True)

    def generate_text(self, *args, **kwargs):
        """Texts in, generated texts out (families that generate)."""
        raise self._other_family("generate_text", generating=True)

    def stream(self, *args, **kwargs):
        """A reply's text as it is generated (families that generate)."""
        raise self._other_family("stream", generating=True)

    def chat(self, *args, **kwargs):
        """A reply to a conversation (families that generate)."""
        raise self._other_family("chat", generating=True)

    def apply_chat_template(self, *args, **kwargs):
        """A conversation's token ids in the model's chat template (families that generate)."""
        raise self._other_family("apply_chat_template", generating=True)

    def classify(self, *args, **kwargs):
        """Labels and scores, as transformers' pipelines return them (families that classify)."""
        raise self._other_family("classify", generating=False)

    def _other_family(self, verb: str, generating: bool) -> InputError:
        owners = [f.display_name for f in FAMILIES if (f.generates if generating else f.classifies)]
        return InputError(f"{verb} is for {' and '.join(owners)} artifacts; this {self.family.display_name} "
                          f"artifact {self.DOES} ({', '.join(self.VERBS)})")

    def _require_text(self) -> TextCodec:
        if self._text is None:
            raise InputError(f"{self.folder} has no tokenizer.json; pass token ids instead of text")
        return self._text

    def _encode_texts(self, texts, task: str | Sequence[str] | None, truncation: bool, pairs: bool = False,
                      left: bool = False, add_special_tokens: bool = True):
        """Text rows encoded as transformers' tokenizer encodes them and padded: (encodings, ids, mask,
        token type ids). A row longer than the positions its task leaves is refused, or cut to them with
        truncation=True."""
        codec = self._require_text()
        rows = inputs.text_rows(texts, pairs)
        table = self._table
        names, owners = self._members(task, len(rows))
        taken = np.array([table.positions[r] for r in inputs.task_indices(names, list(table.names),
                                                                         len(rows) if owners is None else len(owners))])
        if owners is not None:  # an ensemble's row leaves the positions its widest member leaves
            taken = np.maximum.reduceat(taken, np.unique(owners, return_index=True)[1])
        if self.PADDING_TAKES_POSITIONS:  # every row is padded to the widest, so the widest prompt bounds all
            taken[:] = taken.max()
        encoded = codec.encode(rows, (self.info.max_positions - taken).tolist(), truncation, add_special_tokens)
        return (encoded, *inputs.pad_rows(encoded, self.info.pad_token_id, left))

    def _prepare(self, input_ids, attention_mask, task: str | Sequence[str] | None, verb: str = "") -> Batch:
        """The checked request as a Batch. A row that names an ensemble becomes one row per member (see
        Batch.owners); a `verb` given refuses ensembles instead."""
        table = self._table  # read once: the whole request is served with this task list
        ids = inputs.as_token_matrix(input_ids, self.info.vocab_size, self.max_batch_size)
        mask = inputs.as_mask(attention_mask, ids.shape)
        if verb:
            self._refuse_ensembles(task, verb)
        task, owners = self._members(task, ids.shape[0])
        if owners is not None:
            ids, mask = ids[owners], mask[owners]
        rows = inputs.task_indices(task, list(table.names), ids.shape[0])
        tokens = np.full(len(ids), ids.shape[1]) if self.PADDING_TAKES_POSITIONS else mask.sum(axis=1)
        self._check_length("input", tokens, [table.positions[r] for r in rows])
        return Batch(ids, mask, rows, table, owners)

    def _check_length(self, what: str, tokens: np.ndarray, virtual: list[int]) -> None:
        """Refuse a batch in which a row's tokens and its task's virtual tokens outnumber the positions."""
        allowed = self.info.max_positions - np.asarray(virtual)
        worst = int(np.argmax(tokens - allowed))
        if tokens[worst] > allowed[worst]:
            raise InputError(f"{what} of {tokens[worst]} tokens is too long: with its task's virtual tokens the "
                             f"model allows {allowed[worst]} (max positions {self.info.max_positions})")

    @staticmethod
    def _run(session: ort.InferenceSession, graph: Path, names: list[str] | None, feeds: dict) -> list[np.ndarray]:
        with running(graph):
            return session.run(names, feeds)
