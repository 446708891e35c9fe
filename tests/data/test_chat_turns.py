"""A chat turn trains exactly what the model must generate to end it, as each family's real template renders it:
the assistant's content and the template's own end of turn; not the whitespace after it, and no EOS the template
does not write (unless data.append_eos asks for one).

The templates are data, copied from the models' tokenizer_config.json files as mistral.rs quotes them in the test
of its chat templates (mistralrs-core/src/pipeline/mod.rs, `test_chat_templates`), each named by its model."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import write_jsonl
from tests.data.test_encode_labels import _encode, _labeled_runs
from tunelab.data.render import RenderSpec, turn_end
from tunelab.errors import DataError
from tunelab.models.load import stop_token_ids

TEMPLATES = {
    # teknium/OpenHermes-2.5-Mistral-7B (ChatML, as Qwen2.5 also writes it)
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    # google/gemma-7b-it
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
             "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    # meta-llama/Meta-Llama-3-8B-Instruct (as vLLM's serving log and many fine-tuning scripts quote it)
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
              "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
              "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
              "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    # microsoft/Phi-3-mini-4k-instruct (closes the whole conversation, not a turn, with EOS)
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
            "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
            "{% endif %}",
    # mistralai/Mistral-7B-Instruct-v0.1 (EOS, then a space, after each answer)
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
               "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
}
MARKERS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]}


@pytest.fixture(scope="module")
def family_tokenizer(tokenizer):
    """stories260K's tokenizer with the families' turn markers as special tokens, as their tokenizers have them."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    return tok


@pytest.mark.parametrize("family, runs, end", [
    ("chatml", ["Hello there<|im_end|>", "See you<|im_end|>"], "<|im_end|>"),
    ("gemma", ["Hello there<end_of_turn>", "See you<end_of_turn>"], "<end_of_turn>"),
    ("llama3", ["Hello there<|eot_id|>", "See you<|eot_id|>"], "<|eot_id|>"),
    ("phi3", ["Hello there<|end|>", "See you<|end|>"], "<|end|>"),
    ("mistral", ["Hello there</s>", "See you</s>"], "</s>"),
])
def test_each_turn_trains_its_content_and_the_templates_own_end(family_tokenizer, family, runs, end):
    spec = RenderSpec(chat_template=TEMPLATES[family])
    _, rendered, (enc,), _ = _encode([CHAT], family_tokenizer, spec)
    assert [r.lstrip() for r in _labeled_runs(enc, family_tokenizer)] == runs
    if family == "phi3":  # its EOS closes the conversation: it is in the text, after the last turn, untrained
        assert rendered[0].text.endswith("<|end|>\n" + family_tokenizer.eos_token)
        assert family_tokenizer.eos_token_id not in [t for t in enc.labels if t != -100]
    elif family != "mistral":  # no EOS the template does not write
        assert family_tokenizer.eos_token not in rendered[0].text
        assert family_tokenizer.eos_token_id not in enc.input_ids
    assert turn_end(spec, family_tokenizer, True) == end
    eos = family_tokenizer.eos_token  # records that are not chats render with a discrete template: EOS ends them
    assert turn_end(spec, family_tokenizer, False) == eos
    assert turn_end(RenderSpec(mode="chat", chat_template=TEMPLATES[family]), family_tokenizer, False) == end


def test_append_eos_adds_one_after_each_turn(family_tokenizer):
    spec = RenderSpec(chat_template=TEMPLATES["chatml"], append_eos=True)
    _, rendered, (enc,), _ = _encode([CHAT], family_tokenizer, spec)
    assert [r.lstrip() for r in _labeled_runs(enc, family_tokenizer)] == ["Hello there<|im_end|></s>",
                                                                          "See you<|im_end|></s>"]
    assert rendered[0].text.count("</s>") == 2 and rendered[0].text.endswith("</s>\n")


def test_a_template_that_never_closes_a_turn_is_refused(family_tokenizer):
    open_ended = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(DataError, match="data.append_eos: true"):
        _encode([CHAT], family_tokenizer, RenderSpec(chat_template=open_ended))
    _, _, (enc,), _ = _encode([CHAT], family_tokenizer, RenderSpec(chat_template=open_ended, append_eos=True))
    assert [r.lstrip() for r in _labeled_runs(enc, family_tokenizer)] == ["Hello there</s>", "See you</s>"]


def test_generation_stops_at_the_end_of_turn_and_the_models_own_end_ids(family_tokenizer):
    class Model:  # an instruct model's generation config lists its end-of-turn ids (Gemma: <eos>, <end_of_turn>)
        class generation_config:
            eos_token_id = [family_tokenizer.eos_token_id, 7]

    end_of_turn = family_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    ids = stop_token_ids(family_tokenizer, Model, ["<end_of_turn>", "two tokens"])
    assert ids == [family_tokenizer.eos_token_id, 7, end_of_turn]  # a multi-token text is a stop string instead


# ChatML with the assistant's content and end of turn in a {% generation %} block, as TRL's assistant_only_loss
# expects (the form quoted by TRL users; transformers records the block's characters)
CHATML_GENERATION = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                     "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                     "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_generation_blocks_agree_with_the_rendered_turns_and_are_what_trains(family_tokenizer, caplog):
    from transformers.utils.chat_template_utils import render_jinja_template

    _, rendered, (enc,), _ = _encode([CHAT], family_tokenizer, RenderSpec(chat_template=CHATML_GENERATION))
    assert [r.lstrip() for r in _labeled_runs(enc, family_tokenizer)] == ["Hello there<|im_end|>", "See you<|im_end|>"]
    _, (blocks,) = render_jinja_template([CHAT["messages"]], chat_template=CHATML_GENERATION,
                                         return_assistant_tokens_mask=True, **family_tokenizer.special_tokens_map)
    assert rendered[0].spans == [tuple(b) for b in blocks]  # the offset-based turns are transformers' blocks
    assert "differ" not in caplog.text
    # a block that also holds the newline: the template's author marked it, so it trains (and the log says so)
    with_newline = CHATML_GENERATION.replace("'<|im_end|>' }}{% endgeneration %}", "'<|im_end|>\\n' }}"
                                             "{% endgeneration %}").replace("{% endif %}{{ '\\n' }}", "{% endif %}")
    _, rendered, _, _ = _encode([CHAT], family_tokenizer, RenderSpec(chat_template=with_newline))
    assert rendered[0].target == "See you<|im_end|>\n"
    assert "differ from the turns found by rendering" in caplog.text


def test_data_check_counts_the_end_of_turn_as_the_end(family_tokenizer, tmp_path):
    from tests.conftest import write_jsonl
    from tunelab.config import DataConfig
    from tunelab.data.audit import audit

    path = write_jsonl(tmp_path / "chats.jsonl", [CHAT, CHAT | {"messages": CHAT["messages"][:2]}])
    cfg = DataConfig(train=str(path))
    result = audit(str(path), cfg, RenderSpec(chat_template=TEMPLATES["gemma"]), family_tokenizer)
    assert result["missing_eos"]["count"] == 0 and "'<end_of_turn>'" in result["missing_eos"]["message"]


@pytest.mark.parametrize("family, runs", [("chatml", ["Hello there<|im_end|>", "See you<|im_end|>"]),
                                          ("gemma", ["Hello there<end_of_turn>", "See you<end_of_turn>"])])
def test_data_check_shows_what_each_turn_trains(tmp_path, family_tokenizer, family, runs):
    """`tunelab data check` quotes each run of trained tokens, so a trained newline after the end of turn would show."""
    from tunelab.config import DataConfig
    from tunelab.data.audit import audit, terminal_preview

    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 3)
    r = audit(str(path), DataConfig(train=str(path)), RenderSpec(chat_template=TEMPLATES[family]), family_tokenizer)
    item = r["preview"][0]
    assert [run.lstrip() for run in item["trained"]] == runs
    assert all(not run.endswith(("\n", " ")) for run in item["trained"])
    shown = terminal_preview(item).splitlines()[-1]
    assert shown == "trained: " + ", ".join(repr(run) for run in item["trained"])
