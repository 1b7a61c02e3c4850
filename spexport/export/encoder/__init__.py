"""`spexport convert` for encoders: a frozen BERT-family model + SEQ_CLS / TOKEN_CLS soft-prompt adapters.

The artifact holds one body graph that every task shares (graph.EncoderBody), a prompt bank
with each task's virtual-token embeddings or KV prefix, and one small head graph per task. Needs the
`[export]` extra.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from spexport.artifact import tensorfile
from spexport.artifact.files import HEADS
from spexport.artifact.manifest import Manifest, ModelInfo, Task
from spexport.converters import SoftPrompt, read_peft_adapter
from spexport.converters.bank import bank_entry
from spexport.converters.heads import Head, read_head
from spexport.errors import AdapterError, ModelError
from spexport.export.common import (
    BANK,
    GRAPH,
    ExportOptions,
    adapter_tasks,
    building,
    finish,
    first_line,
    quiet_tracing,
    read_configs,
    read_model_type,
)
from spexport.export.encoder.graph import detach_body, export_body, export_head, parameters
from spexport.export.encoder.quality import quantize_body
from spexport.export.transformers_api import cache_argument
from spexport.families import ENCODER, model_info


def convert(model_dir: Path, adapters: list[tuple[str, Path]], output: Path, options: ExportOptions) -> Manifest:
    """Export an encoder with every adapter into one artifact at `output`, atomically."""
    on_step = options.on_step
    on_step("converting adapters")  # every check before the model loads
    heads = {name: _read_head(name, Path(path)) for name, path in adapters}
    info = _read_info(model_dir, options.trust_remote_code)
    prompts: dict[str, tuple[SoftPrompt, Head]] = {
        task: (prompt, heads[name])
        for name, tasks in adapter_tasks(adapters, info, ENCODER, model_dir) for task, prompt in tasks.items()}
    with building(output) as staging:
        on_step("loading the frozen model")
        models = _load_encoder(model_dir, {h.kind for h in heads.values()}, options.trust_remote_code)
        model = models["sequence"][0] if "sequence" in models else models["token"][0]  # BERT's pooler is in the first
        body = model.base_model
        for task, (prompt, _) in prompts.items():
            if prompt.kind == "kv" and cache_argument(body) is None:
                raise AdapterError(f"task {task!r}: prefix tuning needs a model that takes a KV cache, and "
                                   f"{type(body).__name__} does not (PEFT cannot run it either); use prompt "
                                   "tuning or P-tuning")
        tasks = []
        (staging / HEADS).mkdir()
        for name, (prompt, head) in prompts.items():
            on_step(f"exporting the head of {name}")
            tasks.append(_export_task(name, prompt, head, *models[head.kind], body, staging))
        tensorfile.save({name: prompt.tensor for name, (prompt, _) in prompts.items()}, staging / BANK)
        on_step("exporting the frozen model to ONNX")
        kinds = {prompt.kind for prompt, _ in prompts.values()}
        with quiet_tracing():
            export_body(body, info.num_layers, info.num_kv_heads, info.head_dim, _position_offset(model),
                        "embeddings" in kinds, "kv" in kinds, staging / GRAPH)
        quantization = None
        if options.quantize:
            on_step(f"quantizing the body to {options.quantize} and measuring its label agreement")
            embeddings = [prompt.tensor for prompt, _ in prompts.values() if prompt.kind == "embeddings"]
            quantization = quantize_body(staging, GRAPH, BANK, info, tasks, options.quantize, model_dir, body,
                                         embeddings)
        return finish(staging, output, model_dir, family=ENCODER.name, model=info, graph=GRAPH, prompt_bank=BANK,
                      tasks=tasks, quantization=quantization, ensembles=options.ensembles)


def explain_unsupported(model_dir: Path, model_type: str) -> None:
    """Say why a classifier that spexport does not export cannot take soft prompts, where that is why."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    classifier = getattr(transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type, ""), None)
    if classifier is not None and "inputs_embeds" not in parameters(classifier):
        raise ModelError(f"{model_dir}: {no_inputs_embeds(model_type, classifier.__name__)}")


def _read_head(name: str, path: Path) -> Head:
    if path.is_file():
        raise AdapterError(f"adapter {name}: {path} is a bare tensor, which holds no classifier head; an encoder "
                           "artifact needs the PEFT adapter folder that saved the task's head")
    config, weights = read_peft_adapter(path)
    return read_head(path, config, weights)


def _read_info(model_dir: Path, trust_remote_code: bool) -> ModelInfo:
    """The encoder's ModelInfo from its config alone: the positions left after its position offset."""
    model_type, _ = read_model_type(model_dir)
    config, _ = read_configs(model_dir, trust_remote_code)
    info = model_info(config, None)
    offset = config.pad_token_id + 1 if model_type in ENCODER.positions_after_pad else 0
    return replace(info, max_positions=info.max_positions - offset, eos_token_ids=[])


def _load_encoder(model_dir: Path, kinds: set[str], trust_remote_code: bool):
    """The model as a classifier of each kind (sequence, token) that the tasks need, with the names of
    its parameters that the checkpoint really holds."""
    model_type, _ = read_model_type(model_dir)
    models = {}
    for kind in sorted(kinds):
        try:
            with quiet_tracing():
                model, loading = _auto(kind).from_pretrained(model_dir, local_files_only=True, dtype="float32",
                                                             output_loading_info=True,
                                                             trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"{model_dir}: cannot load the model weights ({first_line(e)})") from None
        if "inputs_embeds" not in parameters(model.base_model):
            raise ModelError(f"{model_dir}: {no_inputs_embeds(model_type, type(model.base_model).__name__)}")
        missing = set(loading["missing_keys"])
        untrained = sorted(k for k in missing if k.startswith(model.base_model_prefix + "."))
        if untrained:
            raise ModelError(f"{model_dir}: the checkpoint lacks {untrained[0]} of the frozen model (it would be "
                             "random); export a model folder saved with all of its weights")
        models[kind] = (model.eval(), {k for k in model.state_dict() if k not in missing})
    return models


def _auto(kind: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForSequenceClassification if kind == "sequence" else AutoModelForTokenClassification


def no_inputs_embeds(model_type: str, class_name: str) -> str:
    return (f"model type {model_type!r}: {class_name} takes no inputs_embeds, so soft prompts cannot reach it; "
            f"spexport exports encoders {', '.join(sorted(ENCODER.model_types))}")


def _position_offset(model) -> int | None:
    """Where the body's absolute positions start, or None when it takes no position_ids."""
    if "position_ids" not in parameters(model.base_model):
        return None
    return model.config.pad_token_id + 1 if model.config.model_type in ENCODER.positions_after_pad else 0


def _export_task(name: str, prompt: SoftPrompt, head: Head, model, trained: set[str], body, staging: Path) -> Task:
    task_model, labels = _head_model(name, head, model, trained)
    rel = f"{HEADS}/{name.replace('/', '%2F')}.onnx"
    with quiet_tracing():
        export_head(task_model, head.kind == "token", getattr(body, "pooler", None) is not None, staging / rel)
    task, _ = bank_entry(name, prompt, head={"graph": rel, "kind": head.kind, "labels": labels})
    return task


def _head_model(name: str, head: Head, model, trained: set[str]):
    """The task's transformers model with the task's head loaded (its body is never built) and its labels.

    Head parameters come from the adapter, or else from the base checkpoint, as in PEFT; one that
    neither holds would be random, so it is refused.
    """
    import torch

    body = model.base_model_prefix + "."
    head_params = {k: v for k, v in model.state_dict().items() if not k.startswith(body)}
    for key in head.weights:
        if key not in head_params:
            where = "the frozen model every task shares" if key.startswith(body) else "no part of the model"
            raise AdapterError(f"task {name}: the adapter trains {key}, which is {where}; spexport exports one "
                               "frozen body, with only the classifier head per task")
    num_labels = _num_labels(name, head, head_params, model.config.num_labels)
    config = copy.deepcopy(model.config)
    config.num_labels = num_labels
    labels = head.labels or _base_labels(model.config, num_labels)
    if len(labels) != num_labels:
        raise AdapterError(f"task {name}: config.json beside the adapter names {len(labels)} labels, its head has "
                           f"{num_labels}")
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    with torch.device("meta"), quiet_tracing():
        task_model = _auto(head.kind).from_config(config)
    detach_body(task_model)
    state = {k: torch.from_numpy(v) for k, v in head.weights.items()}
    for key, value in head_params.items():
        if key not in state and key in trained and key in task_model.state_dict() \
                and task_model.state_dict()[key].shape == value.shape:
            state[key] = value
    task_model.load_state_dict(state, strict=False, assign=True)
    untrained = sorted(k for k, v in task_model.state_dict().items() if v.is_meta)
    if untrained:
        raise AdapterError(f"task {name}: the classifier head's {untrained[0]} is neither in the adapter nor in the "
                           f"base model; save the adapter with PEFT task_type "
                           f"{'SEQ_CLS' if head.kind == 'sequence' else 'TOKEN_CLS'}, which saves the head")
    return task_model.eval(), labels


def _num_labels(name: str, head: Head, head_params: dict, default: int) -> int:
    """The task's number of labels: the one axis where its head's shapes differ from the base model's."""
    found = set()
    for key, tensor in head.weights.items():
        base = tuple(head_params[key].shape)
        if base == tensor.shape:
            continue
        differ = [n for b, n in zip(base, tensor.shape) if b != n]
        if len(base) != tensor.ndim or len(differ) != 1:
            raise AdapterError(f"task {name}: the adapter's {key} has shape {list(tensor.shape)}, the model's "
                               f"{list(base)}; it was trained for another base model")
        found.add(differ[0])
    if len(found) > 1:
        raise AdapterError(f"task {name}: the adapter's head has no single number of labels ({sorted(found)})")
    return found.pop() if found else default


def _base_labels(config, num_labels: int) -> list[str]:
    """The base model's label names when it has as many, else transformers' LABEL_0, LABEL_1, ..."""
    id2label = getattr(config, "id2label", None) or {}
    if len(id2label) == num_labels:
        return [str(id2label[i]) for i in range(num_labels)]
    return [f"LABEL_{i}" for i in range(num_labels)]
