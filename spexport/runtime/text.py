"""Text in and out: encoding as transformers' `tokenizer(text)` encodes with the same files, decoding as
its `decode(ids, skip_special_tokens=True)`, and decoding that streams.

The tokenizer.json's own padding and truncation settings are turned off (a sentence-transformers
tokenizer pads every text to 128 tokens): the runtime pads each batch itself, and truncates only when
the caller asks, to what the model can take.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from spexport.artifact.files import CHAT_TEMPLATE, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG
from spexport.artifact.integrity import inside_folder
from spexport.errors import ArtifactError, InputError
from spexport.runtime.chat import ChatTemplate
from spexport.runtime.session import first_line

SPECIAL_TOKENS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                  "additional_special_tokens"]
# transformers' clean_up_tokenization, applied when tokenizer_config.json sets clean_up_tokenization_spaces
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class TextCodec:
    """An artifact's tokenizer.json with its tokenizer_config.json: what text becomes, and back."""

    def __init__(self, tokenizer: Tokenizer, config: dict, special_tokens: dict, chat_template: str | None):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens  # as transformers' `special_tokens_map`: names -> strings
        self.clean_up_spaces = config.get("clean_up_tokenization_spaces") is True
        self.truncation_side = "left" if config.get("truncation_side") == "left" else "right"
        self.chat_template = None if chat_template is None else ChatTemplate(chat_template, special_tokens)
        self._truncating: dict[int, Tokenizer] = {}

    @classmethod
    def load(cls, folder: Path, files: list[str]) -> TextCodec | None:
        """The text codec of an artifact whose tokenizer files are `files`; None without a tokenizer.json."""
        if TOKENIZER not in files:
            return None
        try:
            tokenizer = Tokenizer.from_file(str(inside_folder(folder, TOKENIZER)))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ArtifactError(f"{folder}: tokenizer.json is not readable ({first_line(e)})") from None
        config = _json(folder, TOKENIZER_CONFIG) if TOKENIZER_CONFIG in files else {}
        special = {}
        # special_tokens_map.json wins over tokenizer_config.json, as in transformers
        for source in [config, _json(folder, SPECIAL_TOKENS_MAP) if SPECIAL_TOKENS_MAP in files else {}]:
            special.update({k: _content(source[k]) for k in SPECIAL_TOKENS if source.get(k) is not None})
        template = None
        if CHAT_TEMPLATE in files:
            try:
                template = inside_folder(folder, CHAT_TEMPLATE).read_text(encoding="utf-8")
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{folder}: {CHAT_TEMPLATE} is not readable ({e})") from None
        return cls(tokenizer, config, special, template)

    def encode(self, rows: list, budgets: list[int], truncation: bool,
               add_special_tokens: bool = True) -> list[Encoding]:
        """Each row (a text, or a (text, text_pair) tuple) encoded. A row longer than its budget of tokens
        is cut to it with truncation=True (the longest text of a pair first, as transformers) and
        refused without."""
        encoded = []
        for i, (row, budget) in enumerate(zip(rows, budgets)):
            texts = (row,) if isinstance(row, str) else tuple(row)
            encoding = self.tokenizer.encode(*texts, add_special_tokens=add_special_tokens)
            if len(encoding.ids) > budget:
                if not truncation:
                    raise InputError(f"text {i} is {len(encoding.ids)} tokens, more than the model takes with its "
                                     f"task's virtual tokens ({budget}); shorten it or pass truncation=True")
                encoding = self._truncating_tokenizer(budget).encode(*texts, add_special_tokens=add_special_tokens)
            if not encoding.ids:
                raise InputError(f"text {i} encodes to no tokens")
            encoded.append(encoding)
        return encoded

    def _truncating_tokenizer(self, max_length: int) -> Tokenizer:
        tokenizer = self._truncating.get(max_length)
        if tokenizer is None:
            tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
            tokenizer.enable_truncation(max_length, strategy="longest_first", direction=self.truncation_side)
            self._truncating[max_length] = tokenizer
        return tokenizer

    def decode(self, ids: list[int]) -> str:
        """As transformers' `tokenizer.decode(ids, skip_special_tokens=True)`."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.clean_up_spaces:
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text


class TextStream:
    """One row's reply as its tokens arrive, in pieces that never split a character and never show part
    of a stop string. The row stops at the first stop string, which is left out; the pieces joined are
    the reply."""

    def __init__(self, codec: TextCodec, stop: list[str]):
        self.codec, self.stop = codec, stop
        # while the text ends in a proper prefix of one of these, that end may still change: hold it back
        self._pending = stop + ([before for before, _ in CLEAN_UP] if codec.clean_up_spaces else [])
        self.ids: list[int] = []
        self.text = ""  # given out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """The new piece of text after `token` (often empty); sets `stopped` at a stop string."""
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """The rest of the reply, once no token follows."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.codec.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:max(cut, len(self.text))], True
        elif not final:
            if text.endswith("\ufffd"):  # a character whose remaining bytes come with the next token
                return ""
            text = text[:len(text) - _pending_end(text, self._pending)]
        if not text.startswith(self.text):  # a later token rewrote the end; wait until it settles
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def check_stop(stop) -> list[str]:
    """`stop` as a list of non-empty strings (None: no stop strings)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    return list(stops)


def _pending_end(text: str, patterns: list[str]) -> int:
    """The length of the longest end of `text` that is a proper prefix of one of `patterns`."""
    longest = 0
    for pattern in patterns:
        for k in range(min(len(pattern) - 1, len(text)), longest, -1):
            if text.endswith(pattern[:k]):
                longest = k
                break
    return longest


def _content(value):
    """A special token's text: tokenizer configs hold a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_content(v) for v in value]
    return value


def _json(folder: Path, name: str) -> dict:
    try:
        value = json.loads(inside_folder(folder, name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{folder}: {name} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{folder}: {name} is not a JSON object")
    return value
