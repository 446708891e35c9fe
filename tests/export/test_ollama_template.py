"""The Ollama TEMPLATE is derived from the chat template a run trained with, and renders the same text: checked here
on conversations the derivation never saw (Go semantics by tunelab.export.gotemplate, tested on its own), for the
real templates of the model matrix; a template that is not per-role fixed text is refused, not approximated."""

from __future__ import annotations

import pytest

from tests import tokenizer_layouts as layouts
from tests.data.test_chat_turns import TEMPLATES
from tests.models.test_matrix import LLAMA2, OLMO2
from tunelab.errors import TunelabError
from tunelab.export.gotemplate import render_go_template
from tunelab.export.ollama import chat_renderer, derive_go_template, discrete_go_template, modelfile, strips_content

# SmolLM2-135M-Instruct's chat template (ChatML with a default system turn), as its GGUF file carries it
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MARKERS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>",
           "<|end|>"]
UNSEEN = [
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
    [{"role": "system", "content": "S\nwith lines"}, {"role": "user", "content": "What is {{ this }}?"}],
    [{"role": "user", "content": "<|im_end|> inside"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return layouts.byte_level("<|im_end|>", bos="<s>", extra=MARKERS)


@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3", "gemma", "phi3", "olmo2", "mistral", "llama2"])
def test_the_ollama_template_renders_the_chat_template_text(tokenizer, name):
    template = {"smollm2": SMOLLM2, "olmo2": OLMO2, "llama2": LLAMA2}.get(name) or TEMPLATES[name]
    render = chat_renderer(tokenizer, template)
    go = derive_go_template(render, MARKERS)
    stripped = strips_content(render)
    assert stripped == ("trim" in template or ".strip()" in template)  # these trim each message's content
    for messages in UNSEEN:
        if stripped:  # a Go template cannot trim: the Modelfile matches for content without edge white space
            messages = [{**m, "content": m["content"].strip()} for m in messages]
        try:
            want = render(messages, True)
        except Exception:  # the template refuses this conversation (no system role, roles must alternate)
            continue
        assert render_go_template(go, {"Messages": messages}) == want, (name, messages)


def test_the_chatml_cut_is_the_natural_one(tokenizer):
    go = derive_go_template(chat_renderer(tokenizer, TEMPLATES["chatml"]), MARKERS)
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in go
    assert go.endswith("{{ end }}{{ end }}<|im_start|>assistant\n")


def test_a_template_that_is_not_fixed_text_per_role_is_refused(tokenizer):
    numbered = ("{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ messages|length + 1 }}. assistant:{% endif %}")
    with pytest.raises(TunelabError, match="cannot be written as an Ollama template"):
        derive_go_template(chat_renderer(tokenizer, numbered), MARKERS)


def test_a_discrete_template_becomes_a_prompt_template():
    from tunelab.config import Template

    go = discrete_go_template(Template(prompt="Question: {question}\nAnswer:", instruction="Answer briefly."))
    assert render_go_template(go, {"Prompt": "Why?"}) == "Answer briefly.\n\nQuestion: Why?\nAnswer:"
    with pytest.raises(TunelabError, match="2 record fields"):
        discrete_go_template(Template(prompt="{context}\n{question}"))


def test_the_modelfile_names_the_file_template_stops_system_and_sampling():
    text = modelfile("model-f16.gguf", "{{ .Prompt }}", ["<|im_end|>"], "Be brief.",
                     {"temperature": 0, "top_k": 1, "num_predict": 64})
    assert text.splitlines() == ["FROM ./model-f16.gguf", 'TEMPLATE """{{ .Prompt }}"""', 'SYSTEM """Be brief."""',
                                 'PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0", "PARAMETER top_k 1",
                                 "PARAMETER num_predict 64"]
