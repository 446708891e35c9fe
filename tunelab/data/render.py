"""Render examples into text with the character spans the loss is computed on.

Two renderers: a discrete prompt template (`str.format` over the record's fields, optional few-shot
demonstrations drawn from the training set with a seed) and the tokenizer's chat template (each
assistant turn is found by rendering the conversation up to it, so any prefix-stable Jinja
template works).

What a target trains is what the model must generate to end it: a discrete template's target ends
with the tokenizer's EOS token; a chat turn is the assistant's content and the end of turn exactly as
the template renders it (its own end-of-turn token, `<|im_end|>` or `<end_of_turn>`, or an EOS where
the template writes one), not the template's whitespace after it and no EOS it does not render
(`data.append_eos: true` adds one).
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Protocol

from tunelab.config import Template
from tunelab.data.chat_markers import check_fallback_allowed
from tunelab.data.records import Example
from tunelab.errors import DataError

log = logging.getLogger(__name__)

ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_TEMPLATES: dict[str, Template] = {
    "prompt_completion": Template(prompt="{prompt}", target="{completion}"),
    "instruction": Template(prompt=ALPACA, target="{output}"),
    "text_label": Template(prompt="{text}\nLabel:", target=" {label}"),
}
# Used when a chat record meets a tokenizer that has no chat template of its own. The generation
# prompt ends before the space that opens the answer, so prompt and answer tokenize apart cleanly.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTokenizer(Protocol):
    eos_token: str | None
    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclass
class Rendered:
    """An example as text; `spans` are the [start, end) character ranges that are trained."""

    text: str
    spans: list[tuple[int, int]]
    source: str
    row: int

    @property
    def prompt(self) -> str:
        """Everything before the final target: what generation starts from at evaluation."""
        return self.text[: self.spans[-1][0]]

    @property
    def target(self) -> str:
        return self.text[self.spans[-1][0] : self.spans[-1][1]]


@dataclass
class RenderSpec:
    """How to render: `mode` is 'template' or 'chat' (or 'auto': chat records use chat, others template)."""

    mode: str = "auto"
    template: Template | None = None
    num_shots: int = 0
    seed: int = 0
    last_turn_only: bool = False
    chat_template: str | None = None
    append_eos: bool = False  # chat: train an EOS after each assistant turn even where the template renders none


def spec_from_config(cfg: Any) -> RenderSpec:
    """The rendering a run's config describes (data and strategy sections)."""
    return RenderSpec(mode=cfg.data.render, template=cfg.strategy.template, num_shots=cfg.strategy.num_shots,
                      seed=cfg.train.seed, last_turn_only=cfg.data.last_turn_only, chat_template=cfg.data.chat_template,
                      append_eos=cfg.data.append_eos)


def _fields(ex: Example) -> dict[str, Any]:
    values = {**ex.extra, **ex.fields}
    values.setdefault("target", ex.target)
    values.setdefault("input", ex.fields.get("prompt", ex.fields.get("text", "")))
    return values


def _format(pattern: str, ex: Example, part: str) -> str:
    try:
        return pattern.format_map(_fields(ex))
    except KeyError as exc:
        raise DataError(
            f"{ex.source}: the template's {part} refers to {{{exc.args[0]}}}, but the record has the fields "
            f"{sorted(_fields(ex))}. Fix strategy.template or map a column with data.columns."
        ) from None
    except (ValueError, IndexError) as exc:
        raise DataError(f"the template's {part} {pattern!r} is not a valid format string ({exc}). "
                        "Write literal braces as {{ and }}.") from None


def template_for(ex: Example, spec: RenderSpec) -> Template:
    if spec.template is not None:
        return spec.template
    if ex.shape == "instruction" and not ex.fields.get("input", "").strip():
        return Template(prompt=ALPACA_NO_INPUT, target="{output}")
    return DEFAULT_TEMPLATES[ex.shape]


def choose_demos(pool: list[Example], k: int, seed: int, ex: Example) -> list[Example]:
    """k demonstrations for `ex` from `pool`, never `ex` itself; the same for the same seed and row."""
    if k == 0:
        return []
    candidates = [d for d in pool if not (d.source == ex.source)]
    if len(candidates) < k:
        raise DataError(f"strategy.num_shots is {k} but the training data has only {len(candidates)} other examples.")
    # seeded by the file's name and line, not its folder: the same data copied elsewhere gets the same demonstrations
    rng = random.Random(f"{seed}:{os.path.basename(ex.source)}")
    return rng.sample(candidates, k)


def _render_template(ex: Example, spec: RenderSpec, demos: list[Example], eos: str) -> Rendered:
    if ex.shape == "text":
        return Rendered(ex.fields["text"] + eos, [(0, len(ex.fields["text"]) + len(eos))], ex.source, ex.row)
    tpl = template_for(ex, spec)
    parts = [tpl.instruction] if tpl.instruction else []
    for d in demos:
        dt = template_for(d, spec)
        parts.append(_format(dt.prompt, d, "prompt") + _format(dt.target, d, "target"))
    parts.append(_format(tpl.prompt, ex, "prompt"))
    prompt = tpl.demo_separator.join(parts)
    target = _format(tpl.target, ex, "target")
    if not target.strip():
        raise DataError(f"{ex.source}: the target renders as empty text with the template target {tpl.target!r}.")
    text = prompt + target + eos
    return Rendered(text, [(len(prompt), len(text))], ex.source, ex.row)


def _as_messages(ex: Example, spec: RenderSpec, demos: list[Example]) -> list[dict[str, str]]:
    if ex.shape == "chat":
        return ex.fields["messages"]
    messages = []
    for d in [*demos, ex]:
        tpl = template_for(d, spec)
        messages.append({"role": "user", "content": _format(tpl.prompt, d, "prompt").strip()})
        messages.append({"role": "assistant", "content": _format(tpl.target, d, "target").strip()})
    return messages


def _render_chat(ex: Example, spec: RenderSpec, tokenizer: ChatTokenizer, demos: list[Example]) -> Rendered:
    template = spec.chat_template or tokenizer.chat_template
    if not template:  # a base model's tokenizer: the plain fallback, unless its vocabulary marks turns of its own
        check_fallback_allowed(tokenizer, ex.source)
        template = FALLBACK_CHAT_TEMPLATE
    messages = _as_messages(ex, spec, demos)

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as exc:  # Jinja raises many types (TemplateError, TypeError, ...)
            raise DataError(f"{ex.source}: the chat template failed on this conversation: {exc}") from None

    full = render(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if spec.last_turn_only or ex.shape != "chat":
        turns = turns[-1:]
    spans = []
    for i in turns:
        upto = _turn_text(render, tokenizer, messages[: i + 1])
        start, end = len(render(messages[:i], True)), len(upto)
        if not full.startswith(upto) or start > end:
            raise DataError(
                f"{ex.source}: the chat template renders earlier turns differently once later turns follow, so the "
                "assistant turns cannot be located. Set data.chat_template to a prefix-stable template."
            )
        spans.append((start, end))
    eos = tokenizer.eos_token or ""
    # a turn is trained up to and including its EOS where the template writes one, else up to its end of turn;
    # never the template's whitespace after it
    spans = [(s, s + full[s:e].rindex(eos) + len(eos)) if eos in full[s:e] else (s, s + len(full[s:e].rstrip()))
             for s, e in spans]
    if spec.append_eos:
        for k in reversed(range(len(spans))):
            s, e = spans[k]
            if not full[s:e].endswith(eos):
                full = full[:e] + eos + full[e:]
                spans = spans[:k] + [(s, e + len(eos))] + [(a + len(eos), b + len(eos)) for a, b in spans[k + 1:]]
    marked = _generation_spans(template, messages, tokenizer, full, ex.source)
    if marked is not None:  # the template marks what the assistant generates: that is what trains
        if spec.last_turn_only or ex.shape != "chat":
            marked = marked[-1:]
        differ = marked != spans
        if differ and template not in _WARNED:
            _WARNED.add(template)
            log.warning("%s: the chat template's {%% generation %%} blocks (%s) differ from the turns found by "
                        "rendering (%s); the generation blocks are trained", ex.source,
                        [full[a:b] for a, b in marked], [full[a:b] for a, b in spans])
        spans = marked
    content = messages[turns[-1]]["content"].strip()
    if content and full[spans[-1][0] : spans[-1][1]].endswith(content):
        raise DataError(f"{ex.source}: the chat template ends an assistant turn with nothing after its content (no "
                        "end-of-turn token, no EOS), so the model could not learn to stop. Set data.append_eos: true, "
                        "or data.chat_template to a template that closes its turns.")
    return Rendered(full, spans, ex.source, ex.row)


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_WARNED: set[str] = set()  # templates whose generation blocks and rendered turns were found to differ (logged once)


def _generation_spans(template: str, messages: list[dict[str, str]], tokenizer: Any, full: str,
                      source: str) -> list[tuple[int, int]] | None:
    """The character spans of the template's `{% generation %}` blocks (transformers' own renderer records them),
    or None when the template has none."""
    if not GENERATION_BLOCK.search(template):
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, spans = render_jinja_template([messages], chat_template=template, return_assistant_tokens_mask=True,
                                                **getattr(tokenizer, "special_tokens_map", {}))
    except Exception as exc:  # Jinja raises many types
        raise DataError(f"{source}: the chat template failed on this conversation: {exc}") from None
    if rendered[0] != full or not spans[0]:
        return None
    return [tuple(span) for span in spans[0]]


def _turn_text(render: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation rendered up to the end of its last (assistant) turn: the tokens it has in common with the
    same conversation continued by a user, so that what a template writes only at the very end (Phi-3 closes the
    whole conversation with EOS) is not part of the turn."""
    upto = render(messages, False)
    try:
        more = render([*messages, {"role": "user", "content": "\u2063"}], False)
    except DataError:  # the template refuses a conversation that goes on: the turn is all there is
        return upto
    if more.startswith(upto):
        return upto
    mine = tokenizer(upto, add_special_tokens=False, return_offsets_mapping=True)
    theirs = tokenizer(more, add_special_tokens=False)["input_ids"]
    common = 0
    for a, b in zip(mine["input_ids"], theirs):
        if a != b:
            break
        common += 1
    return upto[: mine["offset_mapping"][common - 1][1]] if common else ""


def turn_end(spec: RenderSpec, tokenizer: ChatTokenizer, chat_records: bool) -> str:
    """The text that ends a target under this rendering: EOS for a discrete template; for a chat template what it
    trains after an assistant's content (its end-of-turn token, or EOS), found on a two-turn conversation."""
    eos = tokenizer.eos_token or ""
    if not (spec.mode == "chat" or (spec.mode == "auto" and chat_records)):
        return eos
    answer = "tunelab"
    probe = Example("chat", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}]},
                    "turn end", 0)
    try:
        rendered = _render_chat(probe, spec, tokenizer, [])
    except DataError:
        return eos
    target = rendered.target
    end = target[target.rindex(answer) + len(answer):].strip() if answer in target else ""
    return end or eos


def render_example(ex: Example, spec: RenderSpec, tokenizer: ChatTokenizer, pool: list[Example] | None = None) -> Rendered:
    """Render one example; `pool` supplies few-shot demonstrations (the training examples)."""
    if not tokenizer.eos_token:
        raise DataError("the tokenizer has no EOS token, so targets cannot be ended: set eos_token in its tokenizer_config.json.")
    demos = choose_demos(pool or [], spec.num_shots, spec.seed, ex) if spec.num_shots else []
    use_chat = spec.mode == "chat" or (spec.mode == "auto" and ex.shape == "chat")
    if ex.shape == "chat" and not use_chat:
        raise DataError(f"{ex.source}: a chat record (messages) needs data.render: chat or auto, not '{spec.mode}'.")
    if use_chat and ex.shape == "text":
        raise DataError(f"{ex.source}: plain text records cannot be rendered with a chat template; set data.render: template.")
    if use_chat:
        return _render_chat(ex, spec, tokenizer, demos)
    return _render_template(ex, spec, demos, tokenizer.eos_token)
