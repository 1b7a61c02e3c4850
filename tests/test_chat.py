"""Chat (spexport/runtime/chat.py): the model's template travels in the artifact, sealed; conversations render
to transformers' ids; chat, stream and `spexport run --chat --stop`; one-line errors for what cannot render."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from parity import assert_chat_is_transformers
from transformers import AutoTokenizer

from spexport.artifact.files import CHAT_TEMPLATE
from spexport.cli import main
from spexport.errors import ArtifactError, InputError
from spexport.export import convert
from spexport.runtime import load

# bos/eos as variables, loop controls, tojson, and raise_exception, as real templates use them
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}"
            "{% endif %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
            "{{ m['role'] }} {{ m['content'] | tojson }} {{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")
CHATS = [[{"role": "user", "content": "the cat sat"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
          {"role": "assistant", "content": "two"}]]


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory):
    """tiny_llama's model and adapters, its template held in tokenizer_config.json (as older folders keep it)."""
    root = tmp_path_factory.mktemp("chat")
    model = root / "model"
    shutil.copytree(tiny_llama["model"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    convert(model, list(tiny_llama["adapters"].items()), root / "artifact")
    return {"model": model, "artifact": root / "artifact", "runtime": load(root / "artifact")}


def test_template_is_carried_in_the_artifact_and_sealed(chat_model, tmp_path):
    manifest = json.loads((chat_model["artifact"] / "spexport.json").read_text())
    assert CHAT_TEMPLATE in manifest["tokenizer_files"] and CHAT_TEMPLATE in manifest["files"]
    assert (chat_model["artifact"] / CHAT_TEMPLATE).read_text() == TEMPLATE
    copy = tmp_path / "artifact"
    shutil.copytree(chat_model["artifact"], copy)
    (copy / CHAT_TEMPLATE).write_text(TEMPLATE.replace("assistant", "user"))
    with pytest.raises(ArtifactError, match=f"{CHAT_TEMPLATE} is damaged"):
        load(copy)


def test_named_templates_give_the_default_one(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama["model"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    named = [{"name": "rag", "template": "{{ documents }}"}, {"name": "default", "template": TEMPLATE}]
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    convert(model, [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "artifact")
    assert (tmp_path / "artifact" / CHAT_TEMPLATE).read_text() == TEMPLATE


def test_conversations_render_to_transformers_ids(chat_model):
    assert_chat_is_transformers(chat_model["runtime"], AutoTokenizer.from_pretrained(chat_model["model"]), CHATS)


def test_chat_replies_as_generate_on_the_template_ids_and_rows_are_independent(chat_model):
    runtime = chat_model["runtime"]
    assert max(len(ids) for ids in runtime.apply_chat_template(CHATS)) + 6 + 8 <= 64  # room for 8 new tokens
    replies = runtime.chat(CHATS, task=["pt", "prefix"], max_new_tokens=8)
    assert all(replies)
    for chat, task, reply in zip(CHATS, ["pt", "prefix"], replies):
        ids = np.array([runtime.apply_chat_template(chat)])
        new = runtime.generate(ids, task=task, max_new_tokens=8)[0, ids.shape[1]:]
        assert reply == runtime.tokenizer.decode(new.tolist(), skip_special_tokens=True)
        assert runtime.chat(chat, task=task, max_new_tokens=8) == reply
        assert "".join(runtime.stream(chat, task=task, max_new_tokens=8)) == reply


def test_run_streams_chat_replies_and_stops(chat_model):
    runtime = chat_model["runtime"]
    reply = runtime.chat(CHATS[0], task="prefix", max_new_tokens=10)
    stop = reply.split()[1]
    expected = runtime.chat(CHATS[0], task="prefix", max_new_tokens=10, stop=stop)
    assert expected == reply[:reply.index(stop)]
    result = CliRunner().invoke(main, ["run", str(chat_model["artifact"]), "--task", "prefix", "--chat", "the cat sat",
                                       "--stop", stop, "--stop", "zzz", "--max-new-tokens", "10"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    result = CliRunner().invoke(main, ["run", str(chat_model["artifact"]), "--task", "prefix", "--chat", "the cat sat",
                                       "--max-new-tokens", "10", "--json"])
    assert json.loads(result.stdout)["outputs"] == [{"prompt": "the cat sat", "text": reply}]


@pytest.mark.parametrize("call, message", [
    (lambda m: m.chat([{"role": "user"}], task="pt"), r"^message 0 of conversation 0 needs .* and a 'content'$"),
    (lambda m: m.chat([[{"content": "hi"}]], task="pt"), r"^message 0 of conversation 0 needs a 'role'"),
    (lambda m: m.chat([], task="pt"), r"^messages must be a conversation"),
    (lambda m: m.apply_chat_template("hello"), r"^messages must be a conversation"),
    (lambda m: m.chat([{"role": "tool", "content": "x"}], task="pt"),
     r"^the chat template cannot render this conversation \(TemplateError: no tools here\); check its roles"),
    (lambda m: m.stream(["the cat", "one two"], task="pt"), r"^stream takes one text or one conversation"),
    (lambda m: m.generate_text([("the cat", "one two")], task="pt"), r"^texts\[0\] is a sentence pair; pairs are "
                                                                     r"for classifier artifacts"),
    (lambda m: m.chat(CHATS[0], task="pt", stop=[1]), r"^stop must be a string or a list of non-empty strings"),
])
def test_bad_chat_input_is_one_line(chat_model, call, message):
    with pytest.raises(InputError, match=message) as raised:
        call(chat_model["runtime"])
    assert "\n" not in str(raised.value)


def test_an_artifact_without_a_template_says_so(tiny_llama):
    model = load(tiny_llama["artifact"])
    with pytest.raises(InputError, match=r"has no chat template \(the model folder had no chat_template.jinja and no "
                                         r"chat_template in tokenizer_config.json\); format the prompt"):
        model.chat(CHATS[0], task="pt")
