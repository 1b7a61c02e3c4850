"""One generation loop for the families that generate (decoder-only and encoder-decoder).

A family's model gives the loop its `Steps`: the first step runs the prompt, each next step one new
token per row. The loop chooses tokens and yields them a column at a time: `generate` collects the
columns, and the text verbs (`generate_text`, `chat`, `stream`) turn each into text as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from spexport.errors import InputError
from spexport.runtime import inputs, sampling
from spexport.runtime.base import Batch, ServedArtifact, non_finite_logits
from spexport.runtime.chat import conversations
from spexport.runtime.text import TextCodec, TextStream, check_stop


class Steps(Protocol):
    """A generation's model calls on its `graph`, each returning every row's next-token logits [batch, vocab]."""

    graph: Path

    def first(self) -> np.ndarray:
        """Run the prompt; the logits at each row's last real token, wherever its padding is."""

    def next(self, tokens: np.ndarray) -> np.ndarray:
        """Feed each row's newest token [batch]."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to choose new tokens: greedy unless do_sample, then temperature, top-k and top-p (transformers'
    order), repeatable with a seed (each row its own random stream, seeded alike); repetition_penalty first, as
    transformers' RepetitionPenaltyLogitsProcessor (a token already in the row's sequence has its logit divided by
    it, or multiplied if negative). prompt_lookup_num_tokens: greedy rows draft that many tokens from their own
    prompt and output and keep the ones the model agrees with (decoder-only; the tokens are the same)."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    prompt_lookup_num_tokens: int | None = None

    def __post_init__(self):
        inputs.check_generation(self.max_new_tokens, self.do_sample, self.temperature, self.top_k, self.top_p,
                                self.seed, self.repetition_penalty)
        lookup = self.prompt_lookup_num_tokens
        if lookup is not None and (not inputs.is_whole(lookup) or lookup < 0):
            raise InputError(f"prompt_lookup_num_tokens must be a whole number >= 0 or None, got {lookup!r}")


def ensemble_logits(logits: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Per request row, what its token is chosen from [requests, vocab]: a row of its own keeps its logits;
    an ensemble's rows (one per member, `owners` naming their request row) give the mean of their
    log_softmax, in float64 so that the mean does not depend on the members' order beyond rounding."""
    firsts, counts = np.unique(owners, return_index=True, return_counts=True)[1:]
    out = logits[firsts].astype(np.float64)
    for row in np.flatnonzero(counts > 1):
        part = logits[owners == row].astype(np.float64)
        top = part.max(axis=-1, keepdims=True)
        log_probs = part - top - np.log(np.exp(part - top).sum(axis=-1, keepdims=True))
        out[row] = log_probs.mean(axis=0)
    return out


def token_columns(steps: Steps, config: GenerationConfig, room: int, eos_token_ids: list[int], pad_token_id: int,
                  forced: Callable[[int], int | None], seen: np.ndarray | None = None,
                  stopped: np.ndarray | None = None, owners: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Each step's new token per request row, for at most max_new_tokens steps and `room` positions.

    `forced(step)` is a token the model prescribes at that step, or None. `seen` [rows, vocab] marks the
    tokens already in each row's sequence, for the repetition penalty. A row that has given an EOS, or
    that the caller marks in `stopped` between two columns, gets the pad token from then on; the loop
    ends when every row has. `owners` [rows]: the request row of each row the model runs, when an
    ensemble runs one row per member; the members' rows get their request row's token (see
    `ensemble_logits`).
    """
    eos = np.array(eos_token_ids, np.int64)
    count = min(config.max_new_tokens, room)
    if count <= 0:
        return
    logits = steps.first()
    requests = len(logits) if owners is None else owners.max() + 1
    unfinished = np.ones(requests, bool)
    # one stream per request row, each seeded as that request alone would be
    rngs = [np.random.default_rng(config.seed) for _ in range(requests)]
    for step in range(count):
        if seen is not None:
            logits = sampling.penalize_repetition(logits, seen, config.repetition_penalty)
        if owners is not None:
            logits = ensemble_logits(logits, owners)
        try:
            chosen = sampling.next_tokens(logits, config.do_sample, config.temperature, config.top_k, config.top_p,
                                          rngs)
        except FloatingPointError:
            raise non_finite_logits(steps.graph) from None
        token = forced(step)
        chosen = np.where(unfinished, chosen if token is None else token, pad_token_id).astype(np.int64)
        yield chosen
        unfinished &= ~np.isin(chosen, eos) & (True if stopped is None else ~stopped)
        if not unfinished.any() or step == count - 1:
            return
        if owners is not None:
            chosen = chosen[owners]  # one shared continuation for an ensemble's members
        if seen is not None:
            seen[np.arange(len(chosen)), chosen] = True
        logits = steps.next(chosen)


class GeneratingModel(ServedArtifact):
    """A served artifact that generates: `generate`, and the text verbs over the family's `_steps`."""

    VERBS = ("logits", "generate", "generate_text", "stream", "chat", "apply_chat_template")
    DOES = "generates text"
    PAD_TEXT_LEFT = True  # generate_text's padding side: a decoder-only model continues each row at its right end

    def _steps(self, batch: Batch, new_tokens: int) -> Steps:
        """The model calls of a generation of at most `new_tokens` tokens."""
        raise NotImplementedError

    def _room(self, batch: Batch) -> int:
        """New tokens the batch's positions leave room for."""
        raise NotImplementedError

    def _sequence_start(self, ids: np.ndarray) -> np.ndarray:
        """What `generate` returns ahead of the new tokens."""
        raise NotImplementedError

    def _sequence_so_far(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens transformers' logits processors see before the first new one, and their mask."""
        return ids, mask

    def _forced_token(self, step: int, config: GenerationConfig) -> int | None:
        return None

    def text_codec(self) -> TextCodec | None:
        """The artifact's tokenizer and decoding rules (None without a tokenizer.json)."""
        return self._text

    def _token_columns(self, batch: Batch, config: GenerationConfig,
                       stopped: np.ndarray | None = None) -> Iterator[np.ndarray]:
        if config.prompt_lookup_num_tokens:
            raise InputError("prompt_lookup_num_tokens is for decoder-only artifacts; this is "
                             f"{self.family.display_name}")
        seen = None
        if config.repetition_penalty != 1.0:
            tokens, real = self._sequence_so_far(batch.ids, batch.mask)
            seen = np.zeros((len(batch.ids), self.info.vocab_size), bool)
            seen[np.nonzero(real)[0], tokens[real == 1]] = True
        room = self._room(batch)
        return token_columns(self._steps(batch, min(config.max_new_tokens, room)), config, room,
                             self.info.eos_token_ids, self.info.padding_token,
                             lambda step: self._forced_token(step, config), seen, stopped, batch.owners)

    def _new_tokens(self, batch: Batch, config: GenerationConfig) -> np.ndarray:
        columns = list(self._token_columns(batch, config))
        return np.stack(columns, axis=1) if columns else np.empty((len(batch.ids[batch.firsts]), 0), np.int64)

    def _reply_pieces(self, ids: np.ndarray, mask: np.ndarray, task, config: GenerationConfig,
                      stop: list[str]) -> Iterator[list[str]]:
        """Each step's new piece of text per row as the tokens come; last, the rest of every row's reply.
        A row ends at an EOS or at its first stop string."""
        batch = self._prepare(ids, mask, task)
        streams = [TextStream(self._require_text(), stop) for _ in batch.ids[batch.firsts]]
        ended = np.zeros(len(streams), bool)
        eos = set(self.info.eos_token_ids)
        for column in self._token_columns(batch, config, stopped=ended):
            pieces = [""] * len(streams)
            for row, (stream, token) in enumerate(zip(streams, column.tolist())):
                if ended[row]:
                    continue
                ended[row] = token in eos  # an EOS ends the reply and is no part of its text
                if not ended[row]:
                    pieces[row] = stream.push(token)
                    ended[row] = stream.stopped
            yield pieces
        yield [stream.finish() for stream in streams]

    def _replies(self, ids, mask, task, config: GenerationConfig, stop: list[str]) -> list[str]:
        replies = [""] * len(ids)
        for pieces in self._reply_pieces(ids, mask, task, config, stop):
            replies = [reply + piece for reply, piece in zip(replies, pieces)]
        return replies

    def _chat_ids(self, messages, task) -> tuple[np.ndarray, np.ndarray, bool]:
        """The conversations rendered and encoded as `apply_chat_template` does, left-padded; and whether one
        conversation was given."""
        chats, one = conversations(messages)
        rendered = [self._require_template().render(chat, add_generation_prompt=True) for chat in chats]
        _, ids, mask, _ = self._encode_texts(rendered, task, truncation=False, left=self.PAD_TEXT_LEFT,
                                             add_special_tokens=False)
        return ids, mask, one

    def _require_template(self):
        template = self._require_text().chat_template
        if template is None:
            raise InputError(f"{self.folder} has no chat template (the model folder had no chat_template.jinja and "
                             "no chat_template in tokenizer_config.json); format the prompt and use generate_text")
        return template

    # -- public verbs ---------------------------------------------------------------------------

    def generate_columns(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
                         max_new_tokens: int = 20, **kwargs) -> Iterator[np.ndarray]:
        """generate's new tokens one column [batch] at a time, as the loop chooses them, for callers that
        stream or stop early (the server); kwargs are generate's settings."""
        config = GenerationConfig(max_new_tokens, **kwargs)
        return self._token_columns(self._prepare(input_ids, attention_mask, task), config)

    def generate(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 repetition_penalty: float = 1.0, prompt_lookup_num_tokens: int | None = None) -> np.ndarray:
        """Token ids as transformers' `generate` returns them: for a decoder-only model the input followed
        by the new tokens; for an encoder-decoder model the decoder start token followed by them.

        Rows may be padded anywhere (left, right, or in gaps); mark padding with attention_mask, and each
        row gets what it gets alone. Rows stop at any of the model's EOS ids (later slots hold the pad token), at
        max_new_tokens, or where the model's positions run out. An encoder-decoder model's
        forced_bos_token_id and forced_eos_token_id apply as in transformers: the first new token, and
        the last one max_new_tokens allows. prompt_lookup_num_tokens (decoder-only): draft that many tokens
        per step from the row's own prompt and output, as transformers does; greedy tokens are unchanged.
        """
        config = GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed, repetition_penalty,
                                  prompt_lookup_num_tokens)
        batch = self._prepare(input_ids, attention_mask, task)
        new = self._new_tokens(batch, config)
        return np.concatenate([self._sequence_start(batch.ids[batch.firsts]), new], axis=1)

    def generate_text(self, texts: str | Sequence[str], task: str | Sequence[str] = None,
                      max_new_tokens: int = 20, stop: str | Sequence[str] | None = None, truncation: bool = False,
                      **kwargs) -> list[str]:
        """Each text's continuation: tokenized as transformers' tokenizer does, padded, generated, decoded.

        stop: strings that end a row where one first appears (it is left out of the text). truncation: cut
        a text too long for the model's positions instead of refusing it. kwargs are generate's settings.
        """
        config = GenerationConfig(max_new_tokens, **kwargs)
        stop = check_stop(stop)
        _, ids, mask, _ = self._encode_texts(texts, task, truncation, left=self.PAD_TEXT_LEFT)
        return self._replies(ids, mask, task, config, stop)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str | list:
        """A conversation (a list of {"role", "content"} dicts) in the model's chat template: the token ids
        transformers' `tokenizer.apply_chat_template` returns, or with tokenize=False the text; for a list of
        conversations, a list of them."""
        chats, one = conversations(messages)
        codec, template = self._require_text(), self._require_template()
        rendered = [template.render(chat, add_generation_prompt=add_generation_prompt) for chat in chats]
        out = rendered if not tokenize else [codec.tokenizer.encode(text, add_special_tokens=False).ids
                                             for text in rendered]
        return out[0] if one else out

    def chat(self, messages, task: str | Sequence[str] = None, max_new_tokens: int = 20,
             stop: str | Sequence[str] | None = None, **kwargs) -> str | list[str]:
        """The assistant's reply to a conversation in the model's chat template: a string for one
        conversation, a list for a list of them (each row as it would be alone). stop and kwargs as for
        generate_text."""
        config = GenerationConfig(max_new_tokens, **kwargs)
        stop = check_stop(stop)
        ids, mask, one = self._chat_ids(messages, task)
        replies = self._replies(ids, mask, task, config, stop)
        return replies[0] if one else replies

    def stream(self, text_or_messages: str | list[dict], task: str | None = None, max_new_tokens: int = 20,
               stop: str | Sequence[str] | None = None, truncation: bool = False, **kwargs) -> Iterator[str]:
        """Generate for one text, or one conversation in the chat template, yielding the reply in pieces as
        the tokens come. The pieces joined are what generate_text or chat returns; a piece never ends
        inside a character or shows part of a stop string."""
        config = GenerationConfig(max_new_tokens, **kwargs)
        stop = check_stop(stop)
        if isinstance(text_or_messages, str):
            _, ids, mask, _ = self._encode_texts(text_or_messages, task, truncation, left=self.PAD_TEXT_LEFT)
        elif isinstance(text_or_messages, (list, tuple)) and text_or_messages \
                and all(isinstance(m, dict) for m in text_or_messages):
            ids, mask, _ = self._chat_ids(text_or_messages, task)
        else:
            raise InputError("stream takes one text or one conversation (a list of {'role': ..., 'content': ...} "
                             "dicts); for many, use generate_text or chat")
        return self._stream_pieces(ids, mask, task, config, stop)

    def _stream_pieces(self, ids, mask, task, config, stop) -> Iterator[str]:
        for pieces in self._reply_pieces(ids, mask, task, config, stop):
            if pieces[0]:
                yield pieces[0]
