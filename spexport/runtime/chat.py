"""Chat templates: a conversation rendered as transformers' `apply_chat_template` renders it.

The template runs in jinja2's immutable sandbox with the settings, filters and globals transformers gives
it (trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`), and the
tokenizer's special tokens as variables (`bos_token`, `eos_token`, ...). The rendered text is then
encoded without adding special tokens, as transformers does.

A template comes with the artifact, so it is not trusted with the process: each render has a budget of
template steps (each loop iteration is at least one), output characters and seconds, and a template that
spends it fails in one line instead of hanging (`Budget`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from spexport.artifact.files import CHAT_TEMPLATE
from spexport.errors import ArtifactError, InputError


@dataclass(frozen=True)
class Budget:
    """What one render may spend: template steps (lines of the compiled template run; every loop iteration
    counts), characters of output, and seconds."""

    steps: int = 2_000_000
    chars: int = 8_000_000
    seconds: float = 2.0


class BudgetExceeded(Exception):
    """A render spent its budget."""


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with repetition (`'x' * n`, `n ** m`) capped before it allocates."""

    intercepted_binops = frozenset({"*", "**"})
    max_chars = Budget.chars

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise BudgetExceeded(f"the exponent {right} is beyond the template's budget")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > self.max_chars:
                    raise BudgetExceeded(f"repeating a value {times} times is beyond the template's budget")
        return super().call_binop(context, operator, left, right)


class ChatTemplate:
    """A chat template (compiled when first used) and the variables it is rendered with."""

    def __init__(self, source: str, variables: dict, budget: Budget = Budget()):
        self.source, self.variables, self.budget = source, variables, budget
        self._template: jinja2.Template | None = None

    def _compiled(self) -> jinja2.Template:
        if self._template is not None:
            return self._template
        environment = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=[_Generation, jinja2.ext.loopcontrols])
        environment.max_chars = self.budget.chars
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        try:
            self._template = environment.from_string(self.source)
        except jinja2.TemplateError as e:
            raise ArtifactError(f"the artifact's {CHAT_TEMPLATE} is not a valid jinja2 template ({_one_line(e)})"
                                ) from None
        return self._template

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        template = self._compiled()
        try:
            return self._budgeted(template.generate(**self.variables, messages=messages, tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt))
        except BudgetExceeded as e:
            raise InputError(f"the chat template broke its budget rendering this conversation ({e}); the template "
                             "loops too long or writes too much: fix the artifact's chat template") from None
        except Exception as e:  # a template may raise anything: raise_exception, a missing key, a type error
            raise InputError(f"the chat template cannot render this conversation ({type(e).__name__}: "
                             f"{_one_line(e)}); check its roles, their order and the message contents") from None


    def _budgeted(self, pieces) -> str:
        """The text of the render generator `pieces`, stopped once it spends the budget: its steps and time
        are counted by a trace function on this thread's template frames, its output as it is produced."""
        budget, deadline, steps = self.budget, time.monotonic() + self.budget.seconds, 0

        def count(frame, event, arg):
            nonlocal steps
            if frame.f_code.co_filename != "<template>":
                return None
            steps += 1
            if steps > budget.steps:
                raise BudgetExceeded(f"more than {budget.steps} template steps")
            if steps % 1024 == 0 and time.monotonic() > deadline:
                raise BudgetExceeded(f"more than {budget.seconds:g} s")
            return count

        out, size, previous = [], 0, sys.gettrace()
        sys.settrace(count)
        try:
            for piece in pieces:
                size += len(piece)
                if size > budget.chars:
                    raise BudgetExceeded(f"more than {budget.chars} characters of output")
                out.append(piece)
        finally:
            sys.settrace(previous)
        return "".join(out)

    def check(self) -> None:
        """ArtifactError if the template cannot compile, or breaks its budget on a small conversation (a
        template that refuses the conversation is fine: it may want other roles)."""
        sample = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
        try:
            self.render(sample, add_generation_prompt=True)
        except InputError as e:
            if "broke its budget" in str(e):
                raise ArtifactError(str(e).replace("rendering this conversation", "on a four-message conversation")
                                    ) from None


def conversations(messages) -> tuple[list[list[dict]], bool]:
    """(the conversations, whether one was given) for one conversation (a list of {"role", "content"}
    dicts) or a list of conversations."""
    one = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], dict)
    batch = [messages] if one else messages
    if not isinstance(batch, (list, tuple)) or not batch:
        raise InputError("messages must be a conversation (a list of {'role': ..., 'content': ...} dicts) "
                         "or a non-empty list of conversations")
    for c, conversation in enumerate(batch):
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise InputError(f"conversation {c} must be a non-empty list of {{'role': ..., 'content': ...}} dicts")
        for m, message in enumerate(conversation):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise InputError(f"message {m} of conversation {c} needs a 'role' (a string) and a 'content'")
    return [list(conversation) for conversation in batch], one


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, with which templates mark the assistant's text for
    transformers' assistant masks, renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own: jinja2's tojson would escape HTML characters
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_template_file(folder: Path) -> None:
    """ArtifactError if `folder`'s chat template (if it has one) breaks its budget: checked as a template
    enters an artifact (convert, add), so a hostile one is refused before anything serves it."""
    path = Path(folder) / CHAT_TEMPLATE
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path} is not readable ({_one_line(e)})") from None
        ChatTemplate(source, {}).check()
