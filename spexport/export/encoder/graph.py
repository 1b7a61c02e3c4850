"""The encoder graphs: one frozen body for every task, and one small head graph per task.

An encoder attends both ways, so virtual tokens cannot be computed once and cached as they are
for a decoder: prompt-tuning and P-tuning embeddings go into the graph as `prompt_embeds` and are
concatenated in front of the caller's token embeddings; prefix tuning (P-tuning v2) goes in as
`kv_prefix`, per-layer keys and values that every layer attends to, as PEFT feeds BERT its
`past_key_values` (`cache` in transformers 5).

Each row must see exactly what it sees alone in PEFT: its own virtual tokens, then its own
tokens, at the positions PEFT gives them. Rows differ in their number of virtual tokens and in
padding (left or right), so inside the body graph each row is compacted: its real slots (virtual
tokens, then the caller's tokens) move to the front in order, padding to the back. Position 0 is
then the token a classifier pools, and positions count from there as they would for the row
alone. Prefix tuning shifts the caller's positions by the row's prefix length, as transformers
does for a cache of that length.

Heads are the part of the task's transformers model after the body (BERT: dropout + classifier on
the pooler output; RoBERTa: dense + tanh + out_proj on token 0; DistilBERT: pre_classifier + ReLU +
classifier). Each is exported by running the task model's own forward with the body replaced by a
stub that returns the body graph's outputs, so no head layout is written down here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from spexport.artifact.ports import (
    HIDDEN_STATES,
    KV_PREFIX,
    POOLER_OUTPUT,
    PREFIX_MASK,
    PROMPT_EMBEDS,
    PROMPT_MASK,
    SEQUENCE_OUTPUT,
    TOKEN_TYPE_IDS,
)
from spexport.export.transformers_api import cache_argument, seeded_cache

OPSET = 17


class EncoderBody(nn.Module):
    """The frozen encoder with per-row virtual-token embeddings and/or KV prefixes."""

    def __init__(self, body: nn.Module, num_layers: int, position_offset: int | None, embeds: bool, kv: bool):
        super().__init__()
        self.body, self.num_layers, self.embeds, self.kv = body, num_layers, embeds, kv
        # None: the body takes no position_ids and counts 0, 1, ... itself (fine after compaction)
        self.position_offset = position_offset
        self.token_types = has_token_types(body)

    def forward(self, input_ids, attention_mask, *prompt):
        tokens = self.body.get_input_embeddings()(input_ids)
        n_embeds = 0
        types = None
        if self.token_types:
            types, *prompt = prompt
        if self.embeds:
            prompt_embeds, prompt_mask, *prompt = prompt
            n_embeds = prompt_embeds.shape[1]
            tokens = torch.cat([prompt_embeds, tokens], dim=1)
            attention_mask = torch.cat([prompt_mask, attention_mask], dim=1)
            if types is not None:  # virtual tokens are of type 0, as PEFT gives them
                types = torch.cat([torch.zeros_like(prompt_mask), types], dim=1)
        # compaction: real slots to the front in order, padding behind them
        n_real = attention_mask.sum(dim=1, keepdim=True)
        order = torch.where(attention_mask == 1, attention_mask.cumsum(dim=1) - 1,
                            n_real + (1 - attention_mask).cumsum(dim=1) - 1)
        hidden_size = tokens.shape[2]
        compact = torch.zeros_like(tokens).scatter(1, order.unsqueeze(2).expand(-1, -1, hidden_size), tokens)
        slots = torch.arange(tokens.shape[1], dtype=torch.int64).unsqueeze(0)
        mask = (slots < n_real).to(torch.int64)
        kwargs = {}
        n_prefix = torch.zeros_like(n_real)
        if self.kv:
            kv_prefix, prefix_mask = prompt
            kwargs[cache_argument(self.body)] = seeded_cache([kv_prefix[:, i, which] for i in range(self.num_layers)
                                                              for which in (0, 1)])
            n_prefix = prefix_mask.sum(dim=1, keepdim=True)
            mask = torch.cat([prefix_mask, mask], dim=1)
        if self.position_offset is not None:
            positions = self.position_offset + n_prefix + slots
            kwargs["position_ids"] = torch.where(slots < n_real, positions, torch.full_like(positions,
                                                                                           self.position_offset))
        if self.token_types:  # each token's type moves with it; padding is type 0
            kwargs["token_type_ids"] = torch.zeros_like(types).scatter(1, order, types)
        out = self.body(inputs_embeds=compact, attention_mask=mask, **kwargs)
        sequence = out[0]
        # the caller's tokens, back in the caller's slots
        caller = order[:, n_embeds:].unsqueeze(2).expand(-1, -1, hidden_size)
        outputs = [sequence, sequence.gather(1, caller)]
        pooled = getattr(out, "pooler_output", None)
        return (*outputs, pooled) if pooled is not None else tuple(outputs)


def export_body(body: nn.Module, num_layers: int, kv_heads: int, head_dim: int, position_offset: int | None,
                embeds: bool, kv: bool, path: Path) -> list[str]:
    """Export the frozen body to `path`; returns its output names."""
    wrapper = EncoderBody(body, num_layers, position_offset, embeds, kv).eval()
    batch, seq, n = 2, 5, 3
    hidden = body.get_input_embeddings().weight.shape[1]
    args = [torch.ones(batch, seq, dtype=torch.int64), torch.ones(batch, seq, dtype=torch.int64)]
    names = ["input_ids", "attention_mask"]
    if wrapper.token_types:
        args.append(torch.zeros(batch, seq, dtype=torch.int64))
        names.append(TOKEN_TYPE_IDS)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in names}
    if embeds:
        args += [torch.zeros(batch, n, hidden), torch.ones(batch, n, dtype=torch.int64)]
        names += [PROMPT_EMBEDS, PROMPT_MASK]
        axes |= {name: {0: "batch_size", 1: "prompt_length"} for name in (PROMPT_EMBEDS, PROMPT_MASK)}
    if kv:
        args += [torch.zeros(batch, num_layers, 2, kv_heads, n + 1, head_dim),
                 torch.ones(batch, n + 1, dtype=torch.int64)]
        names += [KV_PREFIX, PREFIX_MASK]
        axes |= {KV_PREFIX: {0: "batch_size", 4: "prefix_length"}, PREFIX_MASK: {0: "batch_size", 1: "prefix_length"}}
    with torch.no_grad():
        pooled = len(wrapper(*args)) == 3
    outputs = [SEQUENCE_OUTPUT, HIDDEN_STATES] + ([POOLER_OUTPUT] if pooled else [])
    axes |= {SEQUENCE_OUTPUT: {0: "batch_size", 1: "total_length"},
             HIDDEN_STATES: {0: "batch_size", 1: "sequence_length"}, POOLER_OUTPUT: {0: "batch_size"}}
    _export(wrapper, tuple(args), names, outputs, axes, path)
    return outputs


class _BodyStub(nn.Module):
    """Stands in for the body inside a task model: returns the body graph's outputs."""

    def __init__(self):
        super().__init__()
        self.outputs = None

    def forward(self, *args, **kwargs):
        return self.outputs


def detach_body(model: nn.Module) -> None:
    """Put a stub in place of a task model's body, leaving the head."""
    setattr(model, model.base_model_prefix, _BodyStub())


class TaskHead(nn.Module):
    """A task model (body detached) as a function from the body's outputs to its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hidden, pooled=None):
        self.model.base_model.outputs = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
        return self.model(inputs_embeds=hidden).logits


def export_head(model: nn.Module, token_level: bool, pooled: bool, path: Path) -> None:
    """Export a task model's head (body detached): sequence_output (+ pooler_output) or hidden_states -> logits."""
    head = TaskHead(model).eval()
    hidden = torch.zeros(2, 5, model.config.hidden_size)
    first = HIDDEN_STATES if token_level else SEQUENCE_OUTPUT
    args, names = (hidden,), [first]
    if pooled and not token_level:
        args, names = (hidden, torch.zeros(2, model.config.hidden_size)), [first, POOLER_OUTPUT]
    axes = {first: {0: "batch_size", 1: "length"}, POOLER_OUTPUT: {0: "batch_size"},
            "logits": {0: "batch_size", 1: "length"} if token_level else {0: "batch_size"}}
    _export(head, args, names, ["logits"], axes, path)


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], axes: dict, path: Path) -> None:
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs,
                          dynamic_axes={k: v for k, v in axes.items() if k in names + outputs},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def has_token_types(body: nn.Module) -> bool:
    """Whether the body tells the texts of a pair apart by token type (BERT); RoBERTa takes token_type_ids
    but has one type, and its tokenizer gives every token type 0."""
    return "token_type_ids" in parameters(body) and getattr(body.config, "type_vocab_size", 1) > 1


def parameters(module: nn.Module) -> set[str]:
    """The names a module's forward takes."""
    return set(inspect.signature(module.forward).parameters)
