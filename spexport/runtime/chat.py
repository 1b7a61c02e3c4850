"""Chat templates: a conversation rendered as transformers' `apply_chat_template` renders it.

The template runs in jinja2's immutable sandbox with the settings, filters and globals transformers gives
it (trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`), and the
tokenizer's special tokens as variables (`bos_token`, `eos_token`, ...). The rendered text is then
encoded without adding special tokens, as transformers does.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from spexport.artifact.files import CHAT_TEMPLATE
from spexport.errors import ArtifactError, InputError


class ChatTemplate:
    """A chat template (compiled when first used) and the variables it is rendered with."""

    def __init__(self, source: str, variables: dict):
        self.source, self.variables = source, variables
        self._template: jinja2.Template | None = None

    def _compiled(self) -> jinja2.Template:
        if self._template is not None:
            return self._template
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[_Generation, jinja2.ext.loopcontrols])
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
            return template.render(**self.variables, messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template may raise anything: raise_exception, a missing key, a type error
            raise InputError(f"the chat template cannot render this conversation ({type(e).__name__}: "
                             f"{_one_line(e)}); check its roles, their order and the message contents") from None


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
