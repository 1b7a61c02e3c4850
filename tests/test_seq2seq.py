"""Encoder-decoder models: soft-prompted T5 (flan-t5's gated-gelu, untied head), mT5, BART and mBART.

PEFT in PyTorch is the definition of correct: the artifact's logits must match PeftModel's forward
within 1e-4 and its greedy tokens PeftModel.generate's. For prefix tuning the reference tokens are
greedy decoding over PeftModel's forward: PEFT 0.21's generate feeds the decoder cache positions
counted from 0 while its cache holds the prefix, so the causal mask hides the decoder's own tokens
from themselves (test_peft_generate_differs_from_its_forward_for_prefix_tuning pins that).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import BOS, EOS, PAD, VOCAB, save_adapter, save_tokenizer
from click.testing import CliRunner
from peft import (
    MultitaskPromptTuningConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    TaskType,
)
from test_torch_free import run_without_torch
from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    MBartConfig,
    MBartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from spexport.cli import main
from spexport.errors import AdapterError, InputError, OptionError
from spexport.export import convert
from spexport.families import SEQ2SEQ
from spexport.runtime import load

ATOL = 1e-4
NEW_TOKENS = 12
S2S = TaskType.SEQ_2_SEQ_LM
LSTM = PromptEncoderReparameterizationType.LSTM
BART_LIKE = dict(vocab_size=VOCAB, d_model=64, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
                 scale_embedding=True, init_std=0.2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                 decoder_start_token_id=EOS, forced_eos_token_id=EOS)
MODELS = {
    # flan-t5's shape: gated-gelu feed-forward, lm head not tied to the embeddings
    "t5": lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)),
    # T5 v1.1's layout (gated-gelu, untied head) with mT5's config class
    "mt5": lambda: MT5ForConditionalGeneration(MT5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=PAD)),
    # scaled embeddings, and BART's forced BOS/EOS; a larger init_std keeps the tiny model from repeating one token
    "bart": lambda: BartForConditionalGeneration(BartConfig(**BART_LIKE)),
    # pre-norm layers with a final layer norm on both sides
    "mbart": lambda: MBartForConditionalGeneration(MBartConfig(**BART_LIKE)),
}
# set on the generation config: transformers 5's BART configs no longer take forced_bos_token_id
FORCED_BOS = {"bart": BOS, "mbart": BOS}
METHODS = {
    "pt": (lambda n: PromptTuningConfig(task_type=S2S, num_virtual_tokens=n), 5),
    "mlp": (lambda n: PromptEncoderConfig(task_type=S2S, num_virtual_tokens=n, encoder_hidden_size=32), 3),
    "lstm": (lambda n: PromptEncoderConfig(task_type=S2S, num_virtual_tokens=n, encoder_hidden_size=32,
                                           encoder_reparameterization_type=LSTM), 4),
    "prefix": (lambda n: PrefixTuningConfig(task_type=S2S, num_virtual_tokens=n), 6),
    "proj": (lambda n: PrefixTuningConfig(task_type=S2S, num_virtual_tokens=n, prefix_projection=True,
                                          encoder_hidden_size=32), 2),
}
PREFIX_TASKS = {"prefix", "proj"}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Models this small gain nothing from threads (conftest's one_torch_thread)."""


def build_adapter(model_dir, config, folder, seed: int):
    return save_adapter(model_dir, config, folder, seed, AutoModelForSeq2SeqLM)


@pytest.fixture(scope="module", params=sorted(SEQ2SEQ.model_types))
def built(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    model = MODELS[family]()
    if family in FORCED_BOS:
        model.generation_config.forced_bos_token_id = FORCED_BOS[family]
    model.save_pretrained(root / "model")
    save_tokenizer(root / "model")
    adapters = {name: build_adapter(root / "model", make(n), root / name, seed=i + 1)
                for i, (name, (make, n)) in enumerate(METHODS.items())}
    convert(root / "model", list(adapters.items()), root / "artifact")
    return {"family": family, "root": root, "model": root / "model", "adapters": adapters,
            "runtime": load(root / "artifact")}


def peft_model(built, task) -> PeftModel:
    base = AutoModelForSeq2SeqLM.from_pretrained(built["model"])
    return PeftModel.from_pretrained(base, built["adapters"][task]).eval()


def peft_greedy(model: PeftModel, input_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding over PeftModel's forward, with generate's forced BOS/EOS and EOS padding."""
    config = model.get_base_model().generation_config
    ids = torch.from_numpy(input_ids)
    out = torch.full((len(ids), 1), config.decoder_start_token_id)
    done = torch.zeros(len(ids), dtype=torch.bool)
    with torch.no_grad():
        for step in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=out).logits
            chosen = logits[:, -1].argmax(-1)
            forced = config.forced_bos_token_id if step == 0 else None
            forced = config.forced_eos_token_id if step == max_new_tokens - 1 else forced
            chosen = torch.full_like(chosen, forced) if forced is not None else chosen
            chosen = torch.where(done, config.pad_token_id, chosen)
            out = torch.cat([out, chosen[:, None]], dim=1)
            done |= chosen == config.eos_token_id
            if done.all():
                break
    return out.numpy()


def peft_generate(model: PeftModel, input_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False).numpy()


def _rows(seed=1, lengths=(5, 9, 3, 7, 6)):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 150, size=n).astype(np.int64) for n in lengths]


def _padded(rows, left=()):
    """Right-padded rows, except those whose index is in `left`."""
    width = max(map(len, rows))
    ids, mask = np.full((len(rows), width), PAD, np.int64), np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        at = slice(width - len(row), width) if i in left else slice(0, len(row))
        ids[i, at], mask[i, at] = row, 1
    return ids, mask


@pytest.mark.parametrize("task", list(METHODS))
def test_logits_and_greedy_match_peft(built, task):
    m, reference = built["runtime"], peft_model(built, task)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 150, size=(2, 9)).astype(np.int64)
    decoder_ids = rng.integers(4, 150, size=(2, 5)).astype(np.int64)
    decoder_ids[:, 0] = m.info.decoder_start_token_id
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), decoder_input_ids=torch.from_numpy(decoder_ids)).logits
    assert np.abs(m.logits(ids, task=task, decoder_input_ids=decoder_ids) - expected.numpy()).max() <= ATOL
    expected = (peft_greedy if task in PREFIX_TASKS else peft_generate)(reference, ids, NEW_TOKENS)
    got = m.generate(ids, task=task, max_new_tokens=NEW_TOKENS)
    assert got.shape[1] == 1 + NEW_TOKENS, "stopped early: pick inputs that do not hit EOS"
    np.testing.assert_array_equal(got, expected)


def test_repetition_penalty_is_transformers(built):
    """transformers penalizes the decoder's own tokens (its start token too), not the encoder's input."""
    m, reference = built["runtime"], peft_model(built, "pt")
    ids = torch.from_numpy(np.random.default_rng(0).integers(4, 150, size=(2, 9)).astype(np.int64))
    with torch.no_grad():
        want = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, repetition_penalty=1.5).numpy()
    np.testing.assert_array_equal(m.generate(ids.numpy(), task="pt", max_new_tokens=NEW_TOKENS,
                                             repetition_penalty=1.5), want)
    assert not np.array_equal(m.generate(ids.numpy(), task="pt", max_new_tokens=NEW_TOKENS), want)


def test_peft_generate_differs_from_its_forward_for_prefix_tuning(built):
    """If PEFT's generate comes to agree with its forward, test prefix tuning against generate too.
    Compared on scores: on the tiny BART the greedy tokens happen to agree all the same."""
    reference, row = peft_model(built, "prefix"), torch.from_numpy(_rows()[1][None])
    with torch.no_grad():
        generated = reference.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=4,
                                       do_sample=False, output_scores=True, return_dict_in_generate=True)
        forward = reference(input_ids=row, attention_mask=torch.ones_like(row),
                            decoder_input_ids=generated.sequences[:, :-1]).logits
    # scores are after generate's logits processors (forced BOS/EOS); compare the free steps' logits
    free = [step for step in range(1, 3) if torch.isfinite(generated.scores[step]).all()]
    assert free, "no step free of forced tokens to compare"
    assert max(float((generated.scores[step][0] - forward[0, step]).abs().max()) for step in free) > 1e-3


def test_mixed_task_padded_batch_equals_rows_alone(built):
    """Rows of every task and length, right-padded (one left-padded), give what each gives alone."""
    m, rows, tasks = built["runtime"], _rows(), list(METHODS)
    ids, mask = _padded(rows, left={2})
    decoder_ids = np.array([[m.info.decoder_start_token_id, 17, 42, 99]] * len(rows))
    batch_logits = m.logits(ids, mask, task=tasks, decoder_input_ids=decoder_ids)
    batch_tokens = m.generate(ids, mask, task=tasks, max_new_tokens=NEW_TOKENS)
    for i, (row, task) in enumerate(zip(rows, tasks)):
        alone = m.logits(row[None], task=task, decoder_input_ids=decoder_ids[:1])
        assert np.abs(batch_logits[i] - alone[0]).max() <= ATOL
        alone = m.generate(row[None], task=task, max_new_tokens=NEW_TOKENS)[0]
        # a row that stopped at EOS alone is padded in the batch while the others go on
        np.testing.assert_array_equal(batch_tokens[i, :alone.size], alone)
        assert (batch_tokens[i, alone.size:] == m.info.pad_token_id).all()


def test_cached_decoding_matches_full_decoding(built):
    """The decoder's cache branch, step by step over a mixed batch, gives the logits of the no-cache
    branch over the whole sequence: each row's positions start after its own prefix."""
    m, rows, tasks = built["runtime"], _rows(seed=2), list(METHODS)
    ids, mask = _padded(rows)
    task_ids = [m.tasks.index(t) for t in tasks]
    decoder_ids = np.random.default_rng(3).integers(4, 150, size=(len(rows), 6))
    decoder_ids[:, 0] = m.info.decoder_start_token_id
    full = m.logits(ids, mask, task=tasks, decoder_input_ids=decoder_ids)
    encoded, prefix, cache = m._encode(ids, mask, task_ids), m._prefix(task_ids), None
    for step in range(decoder_ids.shape[1]):
        logits, cache = m._decode(decoder_ids[:, step:step + 1], encoded, prefix, cache)
        assert np.abs(logits[:, 0] - full[:, step]).max() <= ATOL


def test_generate_text_and_virtual_tokens_invisible(built):
    m = built["runtime"]
    texts = m.generate_text(["the cat sat", "red green blue yellow"], task=["pt", "prefix"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert m.logits(_rows()[0], task="pt").shape == (1, 1, VOCAB)


def test_manifest(built):
    manifest = json.loads((built["root"] / "artifact" / "spexport.json").read_text())
    assert manifest["family"] == "seq2seq"
    assert (manifest["graph"], manifest["encoder_graph"]) == ("decoder_model_merged.onnx", "encoder_model.onnx")
    shapes = {t["name"]: t["shape"] for t in manifest["tasks"]}
    assert shapes["pt"] == [5, 64] and shapes["prefix"] == [3, 2, 4, 6, 16]
    model = manifest["model"]
    if built["family"] in FORCED_BOS:
        assert (model["decoder_start_token_id"], model["forced_bos_token_id"], model["forced_eos_token_id"]) \
            == (EOS, BOS, EOS)
    else:
        assert model["decoder_start_token_id"] == PAD and model["max_positions"] == (1 << 31) - 1


def test_runtime_without_torch(built):
    ids = np.array([[5, 9, 14, 22, 40, 7], [8, 3, 0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    result = run_without_torch(built["root"] / "artifact", """
ids = np.array([[5, 9, 14, 22, 40, 7], [8, 3, 0, 0, 0, 0]])
mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
result.update({"logits": m.logits(ids, mask, task=["pt", "prefix"]).tolist(),
               "tokens": m.generate(ids, mask, task=["mlp", "proj"], max_new_tokens=5).tolist(),
               "text": m.generate_text(["the cat"], task="lstm", max_new_tokens=3)})
""")
    m = built["runtime"]
    assert result["heavy"] == []
    np.testing.assert_allclose(result["logits"], m.logits(ids, mask, task=["pt", "prefix"]), atol=1e-6)
    assert result["tokens"] == m.generate(ids, mask, task=["mlp", "proj"], max_new_tokens=5).tolist()
    assert result["text"] == m.generate_text(["the cat"], task="lstm", max_new_tokens=3)


def test_cli_inspect_run_and_validate(built):
    """inspect and run serve a seq2seq artifact; validate, which compares with PEFT's decoder-only
    path, refuses it in one line."""
    artifact, m = built["root"] / "artifact", built["runtime"]
    inspected = CliRunner().invoke(main, ["inspect", str(artifact), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.stdout)
    assert report["intact"] and report["summary"]["family"] == "seq2seq"
    assert report["summary"]["encoder_graph"] == "encoder_model.onnx"
    ran = CliRunner().invoke(main, ["run", str(artifact), "the cat sat", "red green", "--task", "prefix",
                                    "--max-new-tokens", "4"])
    assert ran.exit_code == 0, ran.output
    assert ran.stdout.splitlines() == m.generate_text(["the cat sat", "red green"], task="prefix", max_new_tokens=4)
    validated = CliRunner().invoke(main, ["validate", str(artifact), "--model", str(built["model"]),
                                          "--adapter", f"pt={built['adapters']['pt']}"])
    assert validated.exit_code == InputError.exit_code and validated.stdout == ""
    assert validated.stderr.count("\n") == 1
    assert "a seq2seq artifact; spexport validate compares decoder-only artifacts" in validated.stderr


def test_clear_errors(built, tmp_path):
    """Unsupported combinations and bad calls end in spexport's own one-line errors."""
    model, m = built["model"], built["runtime"]
    pt = [("pt", built["adapters"]["pt"])]
    with pytest.raises(OptionError, match="^--bake is not available for seq2seq artifacts"):
        convert(model, pt, tmp_path / "out", bake=True)
    for speed, refused in [({"quantize": "int8"}, "quantize='int8'"), ({"dtype": "float16"}, "dtype='float16'")]:
        with pytest.raises(OptionError, match=f"^{refused} is not supported for seq2seq artifacts"):
            convert(model, pt, tmp_path / "out", **speed)
    causal = {kind: build_adapter(model, config(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
                                  tmp_path / f"causal-{kind}", seed=0)
              for kind, config in [("pt", PromptTuningConfig), ("prefix", PrefixTuningConfig)]}
    mpt = build_adapter(model, MultitaskPromptTuningConfig(task_type=S2S, num_virtual_tokens=3, num_tasks=2,
                                                           num_ranks=2), tmp_path / "mpt", seed=0)
    wide = build_adapter(model, PrefixTuningConfig(task_type=S2S, num_virtual_tokens=3, token_dim=128),
                         tmp_path / "wide", seed=0)
    for adapter, message in [(causal["pt"], "trained with task_type CAUSAL_LM; a seq2seq artifact"),
                             (causal["prefix"], "trained with task_type CAUSAL_LM; a seq2seq artifact"),
                             (mpt, "method MULTITASK_PROMPT_TUNING is not supported"),
                             (wide, "not the model's head size 16")]:
        with pytest.raises(AdapterError, match=message) as caught:
            convert(model, [("bad", adapter)], tmp_path / "out")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="decoder_input_ids has 2 rows"):
        m.logits(_rows()[0], task="pt", decoder_input_ids=[[0], [0]])
    with pytest.raises(InputError, match="classify is for encoder artifacts; this encoder-decoder artifact generates"):
        m.classify(["text"], task="pt")


def test_tasks_added_without_torch_equal_exported_ones(built, tmp_path):
    """`spexport add` on a seq2seq artifact stores embeddings and prefixes as they are (no model run): a
    task removed and added again under another name serves exactly as the exported one."""
    import shutil

    from spexport.artifact import tensorfile
    from spexport.tasks import add_tasks, remove_tasks

    artifact = tmp_path / "artifact"
    shutil.copytree(built["root"] / "artifact", artifact)
    remove_tasks(artifact, ["pt", "prefix"])
    add_tasks(artifact, [("pt2", built["adapters"]["pt"]), ("prefix2", built["adapters"]["prefix"])])
    m, exported = load(artifact), built["runtime"]
    assert m.tasks == ["mlp", "lstm", "proj", "pt2", "prefix2"]
    bank, reference = (tensorfile.load(folder / "prompts.safetensors") for folder in (artifact, built["root"] /
                                                                                       "artifact"))
    ids = np.random.default_rng(0).integers(4, 150, size=(1, 7)).astype(np.int64)
    for new, old in [("pt2", "pt"), ("prefix2", "prefix")]:
        np.testing.assert_array_equal(bank[new], reference[old])
        np.testing.assert_array_equal(m.generate(ids, task=new, max_new_tokens=6),
                                      exported.generate(ids, task=old, max_new_tokens=6))
