"""Encoders: soft-prompted BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DeBERTa-v2 and DistilBERT classifiers,
each task with its own head.

PEFT in PyTorch is the definition of correct. Where PEFT cannot run a combination (prefix tuning of a
RoBERTa-style sequence classifier; under transformers 5, of any classifier), the reference is the
classifier's forward with PEFT's prefix as its body's KV cache: what PEFT does for BERT.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from parity import skip_unless_peft_runs
from peft import (
    MultitaskPromptTuningConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    PerceiverConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from spexport.errors import AdapterError, InputError, ModelError, OptionError
from spexport.export import convert
from spexport.export.transformers_api import cache_argument
from spexport.families import ENCODER
from spexport.runtime import load

ATOL = 1e-4
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = ["the film was great and i loved it", "a dull and awful movie", "the cat sat on the mat",
          "red green blue yellow", "one two three four five six", "spexport runs soft prompts on onnx runtime",
          "good fun bad boring wonderful terrible"] * 10
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
BASES = {
    "bert": lambda vocab, **extra: BertForSequenceClassification(BertConfig(vocab_size=vocab, **TINY, **extra)),
    # pad_token_id 1: positions count from 2, as in real RoBERTa checkpoints
    "roberta": lambda vocab: RobertaForSequenceClassification(RobertaConfig(vocab_size=vocab, pad_token_id=1,
                                                                            **TINY)),
    "distilbert": lambda vocab: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)),
    "xlm-roberta": lambda vocab: XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=vocab, pad_token_id=1, **TINY)),
    # a head on token 0 without a pooler (dense, GELU, out_proj)
    "electra": lambda vocab: ElectraForSequenceClassification(ElectraConfig(vocab_size=vocab, embedding_size=32,
                                                                            **TINY)),
    # DeBERTa-v3's attention: relative positions only (c2p and p2c, log buckets), none added to the input
    "deberta-v2": lambda vocab: DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=vocab, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1, position_buckets=16, **TINY)),
}
# DistilBERT's config has other names, so PEFT needs its shape spelled out.
SHAPE = {"distilbert": dict(token_dim=32, num_layers=2, num_attention_heads=4, num_transformer_submodules=1)}
METHODS = {
    "prompt_tuning": lambda t, n, s: PromptTuningConfig(task_type=t, num_virtual_tokens=n, **s),
    "p_tuning_mlp": lambda t, n, s: PromptEncoderConfig(task_type=t, num_virtual_tokens=n, encoder_hidden_size=16, **s),
    "p_tuning_lstm": lambda t, n, s: PromptEncoderConfig(
        task_type=t, num_virtual_tokens=n, encoder_hidden_size=16,
        encoder_reparameterization_type=PromptEncoderReparameterizationType.LSTM, **s),
    "prefix_tuning": lambda t, n, s: PrefixTuningConfig(task_type=t, num_virtual_tokens=n, **s),
    "prefix_projection": lambda t, n, s: PrefixTuningConfig(task_type=t, num_virtual_tokens=n, prefix_projection=True,
                                                            encoder_hidden_size=16, **s),
}
SEQ, TOK = TaskType.SEQ_CLS, TaskType.TOKEN_CLS
# task name: (task type, method, virtual tokens, labels); every task gets its own random head
TASKS = {
    "bert": {"pt": (SEQ, "prompt_tuning", 4, 3), "mlp": (SEQ, "p_tuning_mlp", 3, 2),
             "lstm": (SEQ, "p_tuning_lstm", 2, 4), "prefix": (SEQ, "prefix_tuning", 5, 5),
             "proj": (SEQ, "prefix_projection", 2, 2),
             "ner-pt": (TOK, "prompt_tuning", 3, 5), "ner-mlp": (TOK, "p_tuning_mlp", 2, 3),
             "ner-prefix": (TOK, "prefix_tuning", 4, 4)},
    "roberta": {"pt": (SEQ, "prompt_tuning", 3, 2), "mlp": (SEQ, "p_tuning_mlp", 4, 3),
                "prefix": (SEQ, "prefix_tuning", 2, 4), "proj": (SEQ, "prefix_projection", 5, 3),
                "ner-prefix": (TOK, "prefix_tuning", 3, 3)},
    "distilbert": {"pt": (SEQ, "prompt_tuning", 3, 3), "lstm": (SEQ, "p_tuning_lstm", 4, 2),
                   "ner-pt": (TOK, "prompt_tuning", 2, 4)},
    "xlm-roberta": {"pt": (SEQ, "prompt_tuning", 3, 2), "mlp": (SEQ, "p_tuning_mlp", 4, 3),
                    "prefix": (SEQ, "prefix_tuning", 2, 4), "proj": (SEQ, "prefix_projection", 5, 3),
                    "ner-pt": (TOK, "prompt_tuning", 2, 4), "ner-prefix": (TOK, "prefix_tuning", 3, 3)},
    "electra": {"pt": (SEQ, "prompt_tuning", 4, 3), "lstm": (SEQ, "p_tuning_lstm", 2, 4),
                "prefix": (SEQ, "prefix_tuning", 5, 5), "proj": (SEQ, "prefix_projection", 2, 2),
                "ner-mlp": (TOK, "p_tuning_mlp", 2, 3), "ner-prefix": (TOK, "prefix_tuning", 4, 4)},
    # no prefix tuning: DeBERTa-v2 takes no KV cache (spexport refuses it, as PEFT does)
    "deberta-v2": {"pt": (SEQ, "prompt_tuning", 4, 3), "mlp": (SEQ, "p_tuning_mlp", 3, 2),
                   "lstm": (SEQ, "p_tuning_lstm", 2, 4), "ner-pt": (TOK, "prompt_tuning", 3, 5)},
}
AUTO = {SEQ: AutoModelForSequenceClassification, TOK: AutoModelForTokenClassification}


# -- building -------------------------------------------------------------------------------------


def build_tokenizer(folder: Path) -> int:
    """A WordPiece tokenizer that wraps texts in [CLS] ... [SEP]; returns its vocabulary size.

    Its vocabulary is fixed (the corpus's words, then letters for anything else), not trained:
    WordPieceTrainer's ids change from run to run, and so would a model trained on them.
    """
    words = sorted({w for text in CORPUS + TEMPLATES + POSITIVE + NEGATIVE for w in text.split() if w != "{}"})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIALS + words + [c for c in letters if c not in words] + [f"##{c}" for c in letters]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", SPECIALS.index("[CLS]")), ("[SEP]", SPECIALS.index("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    return tokenizer.get_vocab_size()


def build_base(family: str, folder: Path, **config) -> Path:
    vocab = build_tokenizer(folder)
    torch.manual_seed(0)
    BASES[family](vocab, **config).save_pretrained(folder)
    return folder


def base_model(model_dir: Path, task_type, num_labels: int):
    return AUTO[task_type].from_pretrained(model_dir, num_labels=num_labels, ignore_mismatched_sizes=True).eval()


def build_adapter(model_dir: Path, family: str, spec: tuple, folder: Path, seed: int) -> Path:
    """A PEFT adapter with random prompt weights and a random head of its own number of labels."""
    task_type, method, n_virtual, num_labels = spec
    torch.manual_seed(seed)
    peft = get_peft_model(base_model(model_dir, task_type, num_labels),
                          METHODS[method](task_type, n_virtual, SHAPE.get(family, {})))
    for param in peft.parameters():
        if param.requires_grad:  # the prompt encoder and the head
            torch.nn.init.normal_(param, std=0.5)
    peft.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(ENCODER.model_types))
def built(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = build_base(family, root / "model")
    adapters = {name: build_adapter(model_dir, family, spec, root / name, seed=i + 1)
                for i, (name, spec) in enumerate(TASKS[family].items())}
    convert(model_dir, list(adapters.items()), root / "artifact")
    return {"family": family, "model": model_dir, "adapters": adapters, "artifact": root / "artifact",
            "runtime": load(root / "artifact")}


# -- the reference ---------------------------------------------------------------------------------


def reference(built: dict, task: str):
    """PEFT for `task`, as a function of one row of token ids -> logits of the caller's tokens."""
    task_type, _, n_virtual, num_labels = TASKS[built["family"]][task]
    peft = PeftModel.from_pretrained(base_model(built["model"], task_type, num_labels), built["adapters"][task]).eval()
    prefix = isinstance(peft.active_peft_config, PrefixTuningConfig)

    def logits(row: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = peft_or_reference(peft, torch.from_numpy(row)[None], n_virtual)[0].numpy()
        return out if task_type == SEQ or prefix else out[n_virtual:]  # PEFT returns virtual positions too

    return logits


def peft_or_reference(peft: PeftModel, ids: torch.Tensor, n_virtual: int, **inputs) -> torch.Tensor:
    """PeftModel's logits; where PEFT cannot run prefix tuning on the classifier, the classifier's own
    forward with PEFT's prefix as its body's KV cache: what PEFT runs for a model whose forward takes
    the cache. PEFT 0.21 cannot run prefix tuning itself on RoBERTa-style sequence classifiers
    (transformers 4.57) nor on any encoder classifier (transformers 5, where the argument is `cache`)."""
    try:
        return peft(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
    except (TypeError, ValueError):
        if not isinstance(peft.active_peft_config, PrefixTuningConfig):
            raise
    model = peft.base_model
    body = model.base_model
    forward = body.forward
    body.forward = functools.partial(forward, **{cache_argument(body): peft.get_prompt(batch_size=len(ids))})
    try:
        return model(input_ids=ids, attention_mask=torch.ones(len(ids), n_virtual + ids.shape[1]), **inputs).logits
    finally:
        body.forward = forward


def sample_rows(vocab_size: int, lengths=(7, 3, 11, 5, 9, 4, 6, 8), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(len(SPECIALS), vocab_size, size=n).astype(np.int64) for n in lengths]


def pad(rows: list[np.ndarray], side: str, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    fill = [[pad_id] * (width - len(r)) for r in rows]
    ids = [f + list(r) if side == "left" else list(r) + f for f, r in zip(fill, rows)]
    mask = [[0] * len(f) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(f) for f, r in zip(fill, rows)]
    return np.array(ids, np.int64), np.array(mask, np.int64)


def caller_slots(row_logits: np.ndarray, mask_row: np.ndarray) -> np.ndarray:
    return row_logits[mask_row == 1] if row_logits.ndim == 2 else row_logits


# -- parity ----------------------------------------------------------------------------------------


def test_every_task_matches_peft(built):
    runtime, diffs = built["runtime"], {}
    rows = sample_rows(runtime.info.vocab_size, lengths=(7, 3, 12))
    for task, (task_type, _, _, num_labels) in TASKS[built["family"]].items():
        expected = reference(built, task)
        for row in rows:
            got = runtime.logits(row[None], task=task)[0]
            want = expected(row)
            assert got.shape == want.shape == ((num_labels,) if task_type == SEQ else (len(row), num_labels))
            diffs[task] = max(diffs.get(task, 0.0), float(np.abs(got - want).max()))
    print(f"\n{built['family']} max |logits - PEFT|: " + ", ".join(f"{t} {d:.1e}" for t, d in diffs.items()))
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.parametrize("side", ["right", "left"])
def test_mixed_task_padded_batch_equals_rows_alone(built, side):
    """Every task of a kind in one padded batch; each row gives what it gives alone, and what PEFT gives."""
    runtime = built["runtime"]
    for task_type in (SEQ, TOK):
        tasks = [t for t, spec in TASKS[built["family"]].items() if spec[0] == task_type]
        tasks = (tasks * 3)[:max(len(tasks), 4)]
        rows = sample_rows(runtime.info.vocab_size, seed=len(tasks))[:len(tasks)]
        ids, mask = pad(rows, side)
        batch = runtime.logits(ids, mask, task=tasks)
        for i, (row, task) in enumerate(zip(rows, tasks)):
            labels = TASKS[built["family"]][task][3]
            assert np.isneginf(batch[i, ..., labels:]).all()  # narrower heads are padded with -inf
            in_batch = caller_slots(batch[i, ..., :labels], mask[i])
            alone = runtime.logits(row[None], task=task)[0]
            assert np.abs(in_batch - alone).max() <= 1e-5
            assert np.abs(in_batch - reference(built, task)(row)).max() <= ATOL


def test_sentence_pairs_match_peft(built):
    """Pairs are encoded as the tokenizer encodes them; a body with token types (BERT, and this RoBERTa of
    two types) gets the second text's type 1, as PEFT gives it, behind virtual tokens of type 0."""
    runtime = built["runtime"]
    pairs = [("the film was great", "a dull movie"), ("one two", "red green blue yellow and more")]
    encodings = [runtime.tokenizer.encode(a, b) for a, b in pairs]
    typed = "token_type_ids" in {i.name for i in runtime.session.get_inputs()}
    type_vocab = json.loads((built["model"] / "config.json").read_text()).get("type_vocab_size", 0)
    assert typed == (type_vocab > 0) and all(1 in e.type_ids for e in encodings)  # DistilBERT, DeBERTa-v2: none
    for task, (task_type, _, n_virtual, num_labels) in TASKS[built["family"]].items():
        if task_type != SEQ:
            continue
        peft = PeftModel.from_pretrained(base_model(built["model"], task_type, num_labels),
                                         built["adapters"][task]).eval()
        results = runtime.classify(pairs, task=task)
        for e, result in zip(encodings, results):
            ids, types = torch.tensor([e.ids]), torch.tensor([e.type_ids])
            with torch.no_grad():
                want = peft_or_reference(peft, ids, n_virtual, **({"token_type_ids": types} if typed else {}))
            want = want[0].numpy()
            got = runtime.logits(ids.numpy(), task=task, token_type_ids=types.numpy())[0]
            assert np.abs(got - want).max() <= ATOL
            probs = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
            assert result == {"label": runtime.labels[task][probs.argmax()], "score": pytest.approx(probs.max())}


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_body_keeps_the_labels_and_reports_their_agreement(built, tmp_path, quantize):
    """--quantize int8 / int4: the shared body gets MatMulNBits weights, the heads stay float32, the manifest holds
    each task's label agreement with the float32 body, and mixed-task padded batches equal rows alone."""
    import onnx

    folder = tmp_path / quantize
    convert(built["model"], list(built["adapters"].items()), folder, quantize=quantize)
    ops = {node.op_type for node in onnx.load(folder / "model.onnx").graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # attention's products stay float32
    quantized, exact = load(folder), built["runtime"]
    record = quantized.manifest.quantization
    assert record["bits"] == int(quantize[3:]) and record["drift"]["reference"] == "float32 graph"
    assert set(record["drift"]["tasks"]) == set(TASKS[built["family"]])
    assert all(0.5 <= d["agreement"] <= 1 and d["positions"] > 0 for d in record["drift"]["tasks"].values())
    rows = sample_rows(exact.info.vocab_size)
    ids, mask = pad(rows, "right")
    for task_type in (SEQ, TOK):
        tasks = [t for t, spec in TASKS[built["family"]].items() if spec[0] == task_type]
        for task in tasks:
            ours, theirs = quantized.logits(ids, mask, task=task), exact.logits(ids, mask, task=task)
            keep = mask.astype(bool) if task_type == TOK else slice(None)
            assert (ours[keep].argmax(-1) == theirs[keep].argmax(-1)).mean() >= 0.8
            bound = 0.1 if quantize == "int8" else 0.3  # measured: 4 bits move the logits ~2-3x as far as 8
            assert np.abs(ours[keep] - theirs[keep]).max() < bound * np.abs(theirs[keep]).max()
        batch = quantized.logits(ids[:len(tasks)], mask[:len(tasks)], task=tasks)
        for i, task in enumerate(tasks):
            labels = TASKS[built["family"]][task][3]
            alone = quantized.logits(rows[i][None], task=task)[0]
            assert np.abs(caller_slots(batch[i, ..., :labels], mask[i]) - alone).max() <= 1e-5


def test_classify_is_softmax_of_logits(built):
    runtime = built["runtime"]
    texts = ["the film was great", "a dull and awful movie, boring"]
    for task, (task_type, _, _, num_labels) in TASKS[built["family"]].items():
        results = runtime.classify(texts, task=task)
        for text, result in zip(texts, results):
            encoding = runtime.tokenizer.encode(text)
            logits = runtime.logits(np.array([encoding.ids]), task=task)[0].astype(np.float64)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            labels = runtime.labels[task]
            assert len(labels) == num_labels
            if task_type == SEQ:
                assert result == {"label": labels[probs.argmax()], "score": pytest.approx(probs.max())}
                continue
            expected = [{"entity": labels[p.argmax()], "score": pytest.approx(p.max()), "index": i,
                         "word": encoding.tokens[i], "start": encoding.offsets[i][0], "end": encoding.offsets[i][1]}
                        for i, p in enumerate(probs)
                        if not encoding.special_tokens_mask[i] and labels[p.argmax()] != "O"]
            assert result == expected


@pytest.mark.parametrize("family, task_type", [("bert", SEQ), ("roberta", SEQ), ("bert", TOK)])
def test_multitask_prompt_tuning_gives_each_source_task_as_peft(tmp_path, family, task_type):
    """An MPT adapter of 3 source tasks becomes tasks x/0..x/2, each PeftModel with task_ids=[i]."""
    model_dir = build_base(family, tmp_path / "model")
    torch.manual_seed(7)
    peft = get_peft_model(base_model(model_dir, task_type, 3),
                          MultitaskPromptTuningConfig(task_type=task_type, num_virtual_tokens=4, num_tasks=3))
    for param in peft.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.5)
    peft.save_pretrained(tmp_path / "mpt")
    runtime = load(convert(model_dir, [("x", tmp_path / "mpt")], tmp_path / "artifact") and tmp_path / "artifact")
    assert runtime.tasks == ["x/0", "x/1", "x/2"]
    peft = PeftModel.from_pretrained(base_model(model_dir, task_type, 3), tmp_path / "mpt").eval()
    rows = sample_rows(runtime.info.vocab_size, lengths=(6, 3, 9))
    ids, mask = pad(rows, "right")
    got = runtime.logits(ids, mask, task=["x/0", "x/1", "x/2"])
    for i, row in enumerate(rows):
        with torch.no_grad():
            want = peft(input_ids=torch.from_numpy(row)[None], task_ids=torch.tensor([i])).logits[0].numpy()
        want = want if task_type == SEQ else want[4:]  # PEFT returns the virtual positions too
        assert np.abs(caller_slots(got[i], mask[i]) - want).max() <= ATOL
    # the source tasks differ, so each row really got its own prompt
    alike = runtime.logits(ids[:1], mask[:1], task="x/1")[0]
    assert np.abs(caller_slots(alike, mask[0]) - caller_slots(got[0], mask[0])).max() > 1e-3


# -- labels, text, torch-free ----------------------------------------------------------------------


def test_labels_come_from_config_beside_the_adapter(tmp_path):
    """A config.json saved beside the adapter names the task's labels; else LABEL_0, LABEL_1, ..."""
    model_dir = build_base("bert", tmp_path / "model")
    named = build_adapter(model_dir, "bert", (TOK, "prompt_tuning", 2, 3), tmp_path / "named", seed=1)
    config = base_model(model_dir, TOK, 3).config
    config.id2label = {0: "O", 1: "B-ANIMAL", 2: "I-ANIMAL"}
    config.save_pretrained(named)
    plain = build_adapter(model_dir, "bert", (SEQ, "prompt_tuning", 2, 4), tmp_path / "plain", seed=2)
    runtime = load(convert(model_dir, [("ner", named), ("topic", plain)], tmp_path / "artifact") and
                   tmp_path / "artifact")
    assert runtime.labels == {"ner": ["O", "B-ANIMAL", "I-ANIMAL"], "topic": [f"LABEL_{i}" for i in range(4)]}
    entities = runtime.classify("the cat sat on the mat", task="ner")[0]
    assert all(e["entity"] != "O" for e in entities)  # as transformers' token-classification pipeline


TORCH_FREE = """
import json, sys
for name in ("torch", "transformers", "peft", "optimum", "safetensors"):
    sys.modules[name] = None  # any import of these now raises ImportError
import numpy as np
from spexport.runtime import load
m = load(sys.argv[1])
ids = np.array(json.loads(sys.argv[2]), np.int64)
sequence, token = json.loads(sys.argv[3])
print(json.dumps({"logits": m.logits(ids, task=sequence).tolist(), "tokens": m.logits(ids, task=token).tolist(),
                  "classify": m.classify(["the film was great", "awful"], task=sequence),
                  "heavy": [n for n in sys.modules if n.split(".")[0] in ("torch", "transformers", "peft")
                            and sys.modules[n]]}))
"""


def test_runtime_without_torch(built):
    runtime = built["runtime"]
    sequence = [t for t, spec in TASKS[built["family"]].items() if spec[0] == SEQ][:2]
    token = next(t for t, spec in TASKS[built["family"]].items() if spec[0] == TOK)
    ids = np.stack(sample_rows(runtime.info.vocab_size, lengths=(6, 6)))
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, str(built["artifact"]), json.dumps(ids.tolist()),
                           json.dumps([sequence, token])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["heavy"] == []
    np.testing.assert_allclose(result["logits"], runtime.logits(ids, task=sequence), atol=1e-6)
    np.testing.assert_allclose(result["tokens"], runtime.logits(ids, task=token), atol=1e-6)
    assert result["classify"] == runtime.classify(["the film was great", "awful"], task=sequence)


# -- a trained P-tuning v2 adapter -----------------------------------------------------------------

POSITIVE, NEGATIVE = ["great", "good", "wonderful", "fun", "loved"], ["awful", "dull", "bad", "boring", "terrible"]
TEMPLATES = ["the film was {}", "a {} movie", "i found it {} and {}", "{} fun", "the cat sat on the mat , {}"]


def _toy_texts(seed: int, count: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(count):
        label = int(rng.integers(2))
        words = POSITIVE if label else NEGATIVE
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        texts.append(template.format(*rng.choice(words, size=template.count("{}"))))
        labels.append(label)
    return texts, labels


def test_trained_p_tuning_v2_adapter_classifies_like_peft(tmp_path):
    """Train a prefix-tuning (P-tuning v2) sentiment adapter briefly; on held-out text the artifact
    gives transformers' pipeline's labels and scores for the PEFT model."""
    from transformers import AutoTokenizer, pipeline

    # weights large enough that a random body mixes the words into [CLS], so there is something to learn
    model_dir = build_base("bert", tmp_path / "model", initializer_range=0.2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    id2label = {0: "negative", 1: "positive"}
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, id2label=id2label,
                                                              label2id={v: k for k, v in id2label.items()})
    peft = get_peft_model(base, PrefixTuningConfig(task_type=SEQ, num_virtual_tokens=6, prefix_projection=True,
                                                   encoder_hidden_size=32))
    texts, labels = _toy_texts(seed=0, count=96)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    skip_unless_peft_runs(peft, tokenizer(texts[:1], return_tensors="pt"))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    for _ in range(80):
        loss = peft(**batch, labels=torch.tensor(labels)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft.eval()
    peft.save_pretrained(tmp_path / "sentiment")
    base.config.save_pretrained(tmp_path / "sentiment")  # the label names travel with the adapter

    runtime = load(convert(model_dir, [("sentiment", tmp_path / "sentiment")], tmp_path / "artifact") and
                   tmp_path / "artifact")
    held_out, truth = _toy_texts(seed=1, count=40)
    ours = runtime.classify(held_out, task="sentiment")
    theirs = pipeline("text-classification", model=peft, tokenizer=tokenizer)(held_out)
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    assert max(abs(o["score"] - t["score"]) for o, t in zip(ours, theirs)) <= ATOL
    accuracy = np.mean([o["label"] == id2label[y] for o, y in zip(ours, truth)])
    print(f"\ntrained P-tuning v2: held-out accuracy {accuracy:.2f}, "
          f"max |score - PEFT pipeline| {max(abs(o['score'] - t['score']) for o, t in zip(ours, theirs)):.1e}")
    assert accuracy >= 0.85, f"the toy task was not learned ({accuracy:.2f}); the comparison would say little"


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A BERT encoder checkpoint with no classifier (as pretrained ones are), and adapters good and bad."""
    root = tmp_path_factory.mktemp("bad")
    model_dir = root / "model"
    build_tokenizer(model_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(),
                         **TINY)).save_pretrained(model_dir)
    found = {"root": root, "model": model_dir,
             "good": build_adapter(model_dir, "bert", (SEQ, "prompt_tuning", 3, 2), root / "good", seed=1),
             "ner": build_adapter(model_dir, "bert", (TOK, "prompt_tuning", 3, 2), root / "ner", seed=2)}
    weights = load_file(found["good"] / "adapter_model.safetensors")
    for name, edit in {"headless": lambda w: {k: v for k, v in w.items() if "classifier" not in k},
                       "trains-pooler": lambda w: {**w, "base_model.bert.pooler.dense.bias": np.zeros(32, np.float32)}
                       }.items():
        shutil.copytree(found["good"], root / name)
        save_file(edit(weights), root / name / "adapter_model.safetensors")
        found[name] = root / name
    shutil.copytree(found["good"], root / "causal")
    config = json.loads((root / "causal" / "adapter_config.json").read_text())
    (root / "causal" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    found["causal"] = root / "causal"
    np.save(root / "bare.npy", weights["prompt_embeddings"])
    found["bare"] = root / "bare.npy"
    PerceiverConfig(num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
                    num_self_attention_heads=2, num_cross_attention_heads=2).save_pretrained(root / "perceiver")
    found["perceiver"] = root / "perceiver"
    distilbert = build_base("distilbert", root / "distilbert")
    found["distilbert"] = distilbert
    found["distilbert-prefix"] = build_adapter(distilbert, "distilbert", (SEQ, "prefix_tuning", 3, 2),
                                               root / "distilbert-prefix", seed=3)
    return found


# id: (model folder, [(task, adapter)], error, message pattern, convert's keyword arguments)
CASES = {
    "head missing": ("model", [("x", "headless")], AdapterError,
                     r"task x: the classifier head's classifier\.\w+ is neither in the adapter nor in the base model; "
                     r"save the adapter with PEFT task_type SEQ_CLS", {}),
    "adapter trains the body": ("model", [("x", "trains-pooler")], AdapterError,
                                r"task x: the adapter trains bert\.pooler\.dense\.bias, which is the frozen model "
                                r"every task shares", {}),
    "not a classifier adapter": ("model", [("x", "causal")], AdapterError,
                                 r"causal: task_type 'CAUSAL_LM' has no classifier; an encoder artifact serves "
                                 r"adapters trained with task_type SEQ_CLS or TOKEN_CLS", {}),
    "bare tensor": ("model", [("x", "bare")], AdapterError, r"adapter x: .*bare\.npy is a bare tensor", {}),
    "no inputs_embeds": ("perceiver", [("x", "good")], ModelError,
                         r"perceiver: model type 'perceiver': PerceiverForSequenceClassification takes no "
                         r"inputs_embeds, so soft prompts cannot reach it", {}),
    "prefix tuning without a KV cache": ("distilbert", [("x", "distilbert-prefix")], AdapterError,
                                         r"prefix tuning needs a model that takes a KV cache, and "
                                         r"DistilBertModel does not \(PEFT cannot run it either\)", {}),
    "bake": ("model", [("x", "good")], OptionError, r"--bake is not available for encoder artifacts", {"bake": True}),
    "writer": ("model", [("x", "good")], OptionError, r"--writer is for decoder-only models; encoder graphs are always "
               r"traced", {"writer": "trace"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_refuses_with_one_line(bad, tmp_path, case):
    model, adapters, error, pattern, kwargs = CASES[case]
    with pytest.raises(error, match=pattern) as raised:
        convert(bad[model], [(name, bad[key]) for name, key in adapters], tmp_path / "artifact", **kwargs)
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_error_is_one_line(bad, tmp_path):
    from click.testing import CliRunner

    from spexport.cli import main

    result = CliRunner().invoke(main, ["convert", "--model", str(bad["model"]), "--adapter", f"x={bad['headless']}",
                                       "--output", str(tmp_path / "artifact")])
    assert result.exit_code == AdapterError.exit_code and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: task x: the classifier head's classifier.")


def test_runtime_refuses_bad_input_with_one_line(bad, tmp_path):
    runtime = load(convert(bad["model"], [("topic", bad["good"]), ("ner", bad["ner"])], tmp_path / "a") and
                   tmp_path / "a")
    ids = np.array([[7, 8, 9]])
    for call, pattern in [
        (lambda: runtime.classify(["fine", 3], task="topic"), r"texts\[1\] is of type int, not str; pass only strings"),
        (lambda: runtime.classify([], task="topic"), r"texts must be a string or a non-empty list of strings"),
        (lambda: runtime.classify(["fine"]), r"pass task=: one name, or one per row, of topic, ner"),
        (lambda: runtime.logits(np.vstack([ids, ids]), task=["topic", "ner"]),
         r"a batch mixes sequence and token classification tasks"),
        (lambda: runtime.logits(np.ones((1, 62), np.int64), task="topic"), r"input of 62 tokens is too long"),
        (lambda: runtime.logits(ids, task="nope"), r"unknown task 'nope'"),
        (lambda: runtime.generate(ids, task="topic"),
         r"generate is for decoder-only and encoder-decoder artifacts; this encoder artifact classifies"),
    ]:
        with pytest.raises(InputError, match=pattern) as raised:
            call()
        assert "\n" not in str(raised.value)
