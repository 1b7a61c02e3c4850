"""Structured output: a logits processor that lets through only the tokens a grammar allows, on llguidance.

A `Grammar` is compiled once per request from a JSON schema (OpenAI's `response_format` `json_schema`),
"any JSON object" (`json_object`) or a Lark grammar (`/v1/completions`' `grammar`). Its processor masks
every token the grammar forbids with -inf; once the grammar is complete only an end-of-sequence token is
left, so the reply ends there.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from spexport.errors import InputError, OptionError

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a model cannot spin in whitespace
MATCHERS_KEPT = 64  # per processor: rows of one request (n choices) each keep theirs

_tokenizers: dict[int, tuple] = {}  # id(tokenizer) -> (tokenizer, its llguidance tokenizer)
_tokenizers_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise OptionError("structured output needs llguidance: pip install 'spexport[serve]'") from None
    return llguidance


def ll_tokenizer(tokenizer, vocab_size: int, eos_token_ids: list[int]):
    """llguidance's view of a model's tokenizer (a `tokenizers.Tokenizer`, `model.tokenizer`), built once per
    tokenizer (about a second for a real vocabulary)."""
    ll = _llguidance()
    with _tokenizers_lock:
        kept = _tokenizers.get(id(tokenizer))
        if kept is None or kept[0] is not tokenizer:
            size = max(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
            try:
                kept = (tokenizer, ll.LLTokenizer(tokenizer.to_str(), n_vocab=size, eos_token=list(eos_token_ids)))
            except (ValueError, RuntimeError) as e:
                raise InputError(f"structured output is not available for this model: llguidance cannot use its "
                                 f"tokenizer ({_one_line(e)})") from None
            _tokenizers[id(tokenizer)] = kept
        return kept[1]


def json_schema_grammar(schema) -> str:
    """The grammar of the JSON documents `schema` (a dict) accepts; InputError for a schema it cannot take."""
    if not isinstance(schema, dict):
        raise InputError("a JSON schema must be a JSON object")
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as e:
        raise InputError(f"the JSON schema cannot be used ({_one_line(e)})") from None


def json_object_grammar() -> str:
    """Any JSON object, as OpenAI's `response_format: {"type": "json_object"}`."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(text: str) -> str:
    """The grammar of a Lark grammar's text (llguidance's Lark dialect, whose start rule is `start`)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("a grammar must be the non-empty text of a Lark grammar")
    try:
        return _llguidance().LLMatcher.grammar_from_lark(text)
    except (ValueError, TypeError, RuntimeError) as e:
        raise InputError(f"the grammar cannot be used ({_one_line(e)})") from None


class Grammar:
    """A compiled grammar over one model's tokenizer; `processor()` gives the logits processor of a request."""

    def __init__(self, grammar: str, tokenizer):
        ll = _llguidance()
        error = ll.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise InputError(f"the grammar cannot be used ({_one_line(error)})")
        self.grammar, self.tokenizer = grammar, tokenizer

    def matcher(self):
        return _llguidance().LLMatcher(self.tokenizer, self.grammar, log_level=0)

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self)


class GrammarProcessor:
    """Masks the tokens the grammar forbids after a row's tokens so far.

    It may be called for several rows of one request (OpenAI's `n`): each row's tokens extend the tokens of
    one matcher it keeps, and a row that no matcher fits (a new row, or one that diverged) gets a matcher of
    its own, fed its tokens so far.
    """

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.matchers: list[tuple[list[int], object]] = []
        self.lock = threading.Lock()

    def __call__(self, tokens: list[int], logits: np.ndarray) -> np.ndarray:
        import llguidance.numpy as lln

        with self.lock:
            matcher = self._matcher_after(list(tokens))
            mask = lln.allocate_token_bitmask(1, self.grammar.tokenizer.vocab_size)
            lln.fill_next_token_bitmask(matcher, mask)
        lln.apply_token_bitmask_inplace(logits.reshape(1, -1), mask)
        return logits

    def _matcher_after(self, tokens: list[int]):
        best = None
        for i, (seen, _) in enumerate(self.matchers):
            if len(seen) <= len(tokens) and tokens[:len(seen)] == seen and (best is None or len(seen) > best[0]):
                best = (len(seen), i)
        if best is None:
            seen, matcher = [], self.grammar.matcher()
        else:
            seen, matcher = self.matchers.pop(best[1])
        new = tokens[len(seen):]
        if new and not matcher.consume_tokens(new):
            raise InputError(f"the grammar does not allow the tokens generated ({_one_line(matcher.get_error())})")
        self.matchers.append((tokens, matcher))
        del self.matchers[:-MATCHERS_KEPT]
        return matcher


def _one_line(error) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
