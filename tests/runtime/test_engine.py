"""The serving engine: continuous batching, prefix reuse, prompt lookup and ensembles, each request's tokens
exactly what `generate` gives it alone."""

from __future__ import annotations

import numpy as np
import pytest
from builders import build_adapter, build_model

from spexport.errors import InputError
from spexport.export import convert
from spexport.runtime import load
from spexport.runtime.engine import Engine
from spexport.runtime.requests import log_softmax

RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(4, 150, n).tolist() for n in (2, 7, 13, 21)]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load(tiny_llama["artifact"])


def alone(model, prompt, task, n, **kwargs) -> list[int]:
    return model.generate([prompt], task=task, max_new_tokens=n, **kwargs)[0, len(prompt):].tolist()


def run(engine: Engine, requests) -> list:
    while engine.step():
        pass
    return [r.collect() for r in requests]


def test_a_short_request_that_arrives_during_a_long_one_finishes_first_with_its_own_tokens(model):
    engine = Engine(model, background=False)
    long = engine.submit(PROMPTS[1], "pt", max_new_tokens=40)
    for _ in range(5):
        engine.step()
    short = engine.submit(PROMPTS[0], "prefix", max_new_tokens=4)
    while not short.finished:
        engine.step()
    assert not long.finished and len(long.tokens) < 40
    assert engine.running_rows() == 1  # the short one's row left at once
    assert short.collect().tokens == alone(model, PROMPTS[0], "prefix", 4)
    assert run(engine, [long])[0].tokens == alone(model, PROMPTS[1], "pt", 40)


def test_mixed_tasks_and_lengths_in_one_batch_equal_each_alone(model):
    engine = Engine(model, background=False)
    specs = [(p, t, 5 + i) for i, p in enumerate(PROMPTS) for t in ("pt", "prefix")]
    requests = [engine.submit(p, t, max_new_tokens=n) for p, t, n in specs]
    answers = run(engine, requests)
    assert engine.stepped_rows > 3 * engine.steps  # they ran together
    for (p, t, n), answer in zip(specs, answers):
        assert answer.tokens == alone(model, p, t, n)
        assert answer.finish_reason in ("stop", "length") and answer.usage["completion_tokens"] == len(answer.tokens)


def test_seeded_sampled_rows_equal_each_alone_in_the_engine_and_in_generate(model):
    settings = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)
    engine = Engine(model, background=False)
    requests = [engine.submit(p, "pt", max_new_tokens=10, seed=s, **settings) for s, p in enumerate(PROMPTS)]
    answers = run(engine, requests)
    for seed, (prompt, answer) in enumerate(zip(PROMPTS, answers)):
        assert answer.tokens == alone(model, prompt, "pt", 10, seed=seed, **settings)
    # generate: every row of a seeded batch draws from its own stream, as it would alone
    batch = model.generate([PROMPTS[1], PROMPTS[1]], task=["pt", "prefix"], max_new_tokens=10, seed=3, **settings)
    assert batch[1, len(PROMPTS[1]):].tolist() == alone(model, PROMPTS[1], "prefix", 10, seed=3, **settings)


def test_a_shared_prompt_start_is_reused_with_identical_tokens(model):
    engine = Engine(model, background=False, block_size=4)
    system = RNG.integers(4, 150, 20).tolist()
    first = run(engine, [engine.submit(system + [5, 6], "pt", max_new_tokens=6)])[0]
    later = [system + [7, 8, 9], system[:12] + [10]]
    answers = run(engine, [engine.submit(p, "pt", max_new_tokens=6) for p in later])
    assert first.usage["cached_tokens"] == 0
    assert [a.usage["cached_tokens"] for a in answers] == [20, 12]
    for prompt, answer in zip(later, answers):
        assert answer.tokens == alone(model, prompt, "pt", 6)
    other_task = run(engine, [engine.submit(system + [7], "prefix", max_new_tokens=6)])[0]
    assert other_task.usage["cached_tokens"] == 0  # the cache is per task
    assert other_task.tokens == alone(model, system + [7], "prefix", 6)


def test_prompt_lookup_keeps_greedy_tokens_and_accepts_drafts(model):
    for prompt in PROMPTS[:3]:
        for task in ("pt", "prefix"):
            plain = alone(model, prompt, task, 30)
            assert alone(model, prompt, task, 30, prompt_lookup_num_tokens=4) == plain
    engine = Engine(model, background=False, prompt_lookup_num_tokens=4)
    requests = [engine.submit(p, t, max_new_tokens=30) for p in PROMPTS[:3] for t in ("pt", "prefix")]
    requests.append(engine.submit(PROMPTS[3], "pt", max_new_tokens=30, prompt_lookup_num_tokens=0))
    answers = run(engine, requests)
    for (prompt, task), answer in zip([(p, t) for p in PROMPTS[:3] for t in ("pt", "prefix")], answers):
        assert answer.tokens == alone(model, prompt, task, 30)
    assert sum(a.usage["accepted_draft_tokens"] for a in answers[:-1]) > 10
    assert engine.steps < sum(len(a.tokens) for a in answers[:-1]) / 6  # fewer steps than tokens: drafts were kept
    assert answers[-1].tokens == alone(model, PROMPTS[3], "pt", 30) and "draft_tokens" not in answers[-1].usage


def test_an_ensemble_picks_from_the_members_mean_log_probabilities(model):
    engine = Engine(model, background=False)
    prompt, members = PROMPTS[2], ("pt", "prefix")
    answer = run(engine, [engine.submit(prompt, members, max_new_tokens=8, logprobs=2)])[0]
    tokens = []
    for entry in answer.logprobs:  # the same choice, made one member at a time with logits()
        mean = np.mean([log_softmax(model.logits([prompt + tokens], task=t)[0, -1]) for t in members], axis=0)
        assert entry.token == int(np.argmax(mean))
        assert entry.logprob == pytest.approx(log_softmax(mean)[entry.token], abs=1e-4)
        tokens.append(entry.token)
    assert answer.tokens == tokens


def test_logits_processors_and_logprobs(model):
    plain = alone(model, PROMPTS[1], "pt", 6)
    banned = plain[0]

    def ban(tokens, logits):
        logits[banned] = -np.inf
        return logits

    engine = Engine(model, background=False)
    answer = run(engine, [engine.submit(PROMPTS[1], "pt", max_new_tokens=6, logits_processors=[ban], logprobs=3)])[0]
    assert banned not in answer.tokens
    first = log_softmax(model.logits([PROMPTS[1]], task="pt")[0, -1])
    first[banned] = -np.inf
    first = log_softmax(first)
    assert answer.logprobs[0].token == int(np.argmax(first))
    assert [t for t, _ in answer.logprobs[0].top] == np.argsort(-first)[:3].tolist()


def test_cancel_frees_the_row_and_ends_the_request(model):
    engine = Engine(model, background=False)
    request = engine.submit(PROMPTS[1], "pt", max_new_tokens=40)
    other = engine.submit(PROMPTS[2], "prefix", max_new_tokens=10)
    engine.step()
    engine.step()
    request.cancel()
    engine.step()
    assert engine.running_rows() == 1
    assert request.collect().finish_reason == "cancelled"
    assert run(engine, [other])[0].tokens == alone(model, PROMPTS[2], "prefix", 10)


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([], {}, "input_ids is empty"),
    ([1, 10_000], {}, "outside the vocabulary"),
    ([1, 2], {"task": "nope"}, "unknown task"),
    ([1, 2], {"max_new_tokens": -1}, "max_new_tokens"),
    ([1, 2], {"logprobs": 99}, "logprobs"),
    ([1, 2], {"logits_processors": [3]}, "callables"),
    ([1, 2], {"prompt_lookup_num_tokens": -2}, "prompt_lookup_num_tokens"),
    ([1] * 200, {}, "too long"),
])
def test_bad_requests_are_refused_in_one_line(model, prompt, kwargs, message):
    engine = Engine(model, background=False)
    with pytest.raises(InputError, match=message) as error:
        engine.submit(prompt, **{"task": "pt", **kwargs})
    assert "\n" not in str(error.value)


def test_a_failing_processor_fails_only_its_request(model):
    def broken(tokens, logits):
        raise ValueError("boom")

    engine = Engine(model, background=False)
    bad = engine.submit(PROMPTS[0], "pt", max_new_tokens=5, logits_processors=[broken])
    good = engine.submit(PROMPTS[1], "pt", max_new_tokens=5)
    with pytest.raises(InputError, match="a logits processor failed: boom"):
        bad.collect()
    assert run(engine, [good])[0].tokens == alone(model, PROMPTS[1], "pt", 5)


def test_the_background_thread_serves_concurrent_requests(model):
    with Engine(model) as engine:
        requests = [engine.submit(p, "pt", max_new_tokens=6) for p in PROMPTS]
        answers = [r.collect() for r in requests]
    assert [a.tokens for a in answers] == [alone(model, p, "pt", 6) for p in PROMPTS]


@pytest.fixture(scope="module", params=["gemma2", "baked"])
def other_artifact(request, tmp_path_factory):
    """A model with sliding-window layers (gemma2), and a baked Llama."""
    root = tmp_path_factory.mktemp(f"engine-{request.param}")
    model_dir = build_model("llama" if request.param == "baked" else "gemma2", root / "model")
    adapters = [("pt", build_adapter(model_dir, "prompt_tuning", root / "pt", 5, seed=1)),
                ("prefix", build_adapter(model_dir, "prefix_tuning", root / "prefix", 3, seed=2))]
    convert(model_dir, adapters, root / "artifact", bake=request.param == "baked")
    return load(root / "artifact")


def test_sliding_window_and_baked_models_stay_exact(other_artifact):
    model = other_artifact
    prompts = [RNG.integers(4, 150, n).tolist() for n in (3, 6, 11)]
    engine = Engine(model, background=False, prompt_lookup_num_tokens=3, block_size=2)
    specs = [(p, t) for p in prompts for t in ("pt", "prefix")] + [(prompts[2][:5] + [9], "pt")]
    answers = run(engine, [engine.submit(p, t, max_new_tokens=12) for p, t in specs])
    for (prompt, task), answer in zip(specs, answers):
        assert answer.tokens == alone(model, prompt, task, 12)
    assert answers[-1].usage["cached_tokens"] == 4


def test_the_prefix_cache_stays_within_its_bytes_least_recently_used_out():
    from spexport.runtime.prefix_cache import PrefixCache

    kv = [np.zeros((1, 9, 4), np.float32)]  # 144 bytes: a prefix slot and 8 tokens
    cache = PrefixCache(max_bytes=300, block=4)
    for first in (1, 2, 3):
        cache.store(("t", None), [first] + list(range(7)), kv, prefix_slots=1)
    assert cache.bytes <= 300 and cache.lookup(("t", None), [1] + list(range(8))) is None  # the oldest went
    past, slots, tokens = cache.lookup(("t", None), [3, 0, 1, 2, 3, 4, 5, 6, 99])
    assert (slots, tokens, past[0].shape) == (1, 8, (1, 9, 4))
    assert cache.lookup(("other", None), [3, 0, 1, 2, 3, 4, 5, 6, 99]) is None


def test_drafts_follow_the_latest_earlier_match_of_the_last_tokens():
    from spexport.runtime.lookup import find_draft

    assert find_draft([5, 6, 7, 8, 1, 5, 6], 2) == [7, 8]
    assert find_draft([5, 6, 7, 5, 6, 9, 5, 6], 3) == [9, 5, 6]
    assert find_draft([1, 2, 3, 4], 3) == []  # no earlier match of two tokens: no draft


def test_the_text_verbs_take_prompt_lookup_with_the_same_text(model):
    texts = ["the cat sat on the mat", "one two three"]
    plain = model.generate_text(texts, task=["pt", "prefix"], max_new_tokens=20)
    assert model.generate_text(texts, task=["pt", "prefix"], max_new_tokens=20, prompt_lookup_num_tokens=3) == plain
    stop = plain[0][4:7]
    assert model.generate_text(texts[0], task="pt", max_new_tokens=20, stop=stop, prompt_lookup_num_tokens=3) == \
        model.generate_text(texts[0], task="pt", max_new_tokens=20, stop=stop)
    assert "".join(model.stream(texts[1], task="prefix", max_new_tokens=20, prompt_lookup_num_tokens=3)) == plain[1]
