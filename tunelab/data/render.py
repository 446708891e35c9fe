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
    notes: tuple[str, ...] = ()  # what tunelab did about a template that is not prefix-stable (data check shows it)

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
    enable_thinking: bool = False  # chat: the thinking mode of a reasoning template, in training and in generation


def spec_from_config(cfg: Any) -> RenderSpec:
    """The rendering a run's config describes (data and strategy sections)."""
    return RenderSpec(mode=cfg.data.render, template=cfg.strategy.template, num_shots=cfg.strategy.num_shots,
                      seed=cfg.train.seed, last_turn_only=cfg.data.last_turn_only, chat_template=cfg.data.chat_template,
                      append_eos=cfg.data.append_eos, enable_thinking=cfg.data.enable_thinking)


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


def _renderer(ex: Example, spec: RenderSpec, tokenizer: ChatTokenizer, template: str) -> Any:
    """render(messages, generation_prompt) -> text, with the run's thinking mode; a template error names the record."""
    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt,
                                                 enable_thinking=spec.enable_thinking)
        except Exception as exc:  # Jinja raises many types (TemplateError, TypeError, ...)
            raise DataError(f"{ex.source}: the chat template failed on this conversation: {exc}") from None
    return render


def _render_chat(ex: Example, spec: RenderSpec, tokenizer: ChatTokenizer, demos: list[Example]) -> Rendered:
    template = spec.chat_template or tokenizer.chat_template
    if not template:  # a base model's tokenizer: the plain fallback, unless its vocabulary marks turns of its own
        check_fallback_allowed(tokenizer, ex.source)
        template = FALLBACK_CHAT_TEMPLATE
    messages = _as_messages(ex, spec, demos)
    render = _renderer(ex, spec, tokenizer, template)
    full = render(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if spec.last_turn_only or ex.shape != "chat":
        turns = turns[-1:]
    last = _last_turn(render, tokenizer, messages, turns[-1], full, ex.source)
    trim = _trimmer(full, tokenizer.eos_token or "")
    last_span = trim(last.span)
    ending = _end_of_turn(full[last_span[0]:last_span[1]], reply_of(messages[turns[-1]]))
    notes = [REWRITES_HISTORY] if last.rewritten else []
    spans = []
    for i in turns[:-1]:
        span, rewritten = _earlier_turn(render, tokenizer, messages, i, full, ending, ex.source)
        spans.append(trim(span))
        if rewritten and REWRITES_HISTORY not in notes:
            notes.append(REWRITES_HISTORY)
    spans.append(last_span)
    if last.think_block:  # the think block tunelab writes goes in at the last turn's start; nothing before it moves
        cut, block = last.think_block
        rendered_length = len(full)
        full = full[:cut] + block + full[cut:].lstrip("\n")
        shift = len(full) - rendered_length
        spans[-1] = (last.generation_start, spans[-1][1] + shift)
        notes.append(OPENS_THINK_BLOCK)
    full, spans = _with_eos(full, spans, tokenizer.eos_token or "") if spec.append_eos else (full, spans)
    marked = _generation_spans(template, messages, tokenizer, full, ex.source, spec.enable_thinking)
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
    content = reply_of(messages[turns[-1]]).strip()
    if content and full[spans[-1][0] : spans[-1][1]].endswith(content):
        raise DataError(f"{ex.source}: the chat template ends an assistant turn with nothing after its content (no "
                        "end-of-turn token, no EOS), so the model could not learn to stop. Set data.append_eos: true, "
                        "or data.chat_template to a template that closes its turns.")
    return Rendered(full, spans, ex.source, ex.row, tuple(notes))


def _trimmer(full: str, eos: str) -> Any:
    """A turn is trained up to and including its EOS where the template writes one, else up to its end of turn;
    never the template's whitespace after it."""
    def trim(span: tuple[int, int]) -> tuple[int, int]:
        s, e = span
        return (s, s + full[s:e].rindex(eos) + len(eos)) if eos and eos in full[s:e] else (s, s + len(full[s:e].rstrip()))
    return trim


def _with_eos(full: str, spans: list[tuple[int, int]], eos: str) -> tuple[str, list[tuple[int, int]]]:
    """data.append_eos: an EOS after each trained turn that does not end with one."""
    for k in reversed(range(len(spans))):
        s, e = spans[k]
        if not full[s:e].endswith(eos):
            full = full[:e] + eos + full[e:]
            spans = spans[:k] + [(s, e + len(eos))] + [(a + len(eos), b + len(eos)) for a, b in spans[k + 1:]]
    return full, spans


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REWRITES_HISTORY = (
    "the chat template is not prefix-stable: it renders an assistant turn differently once later turns follow "
    "(Qwen3's drops the turn's think block and reasoning from the history). tunelab trains the last assistant turn "
    "as the template renders it at that turn (its think block, then the reply and the end of turn) and each earlier "
    "turn as the final conversation renders it (the reply and the end of turn, as the model reads it back as "
    "history; its reasoning is not trained). data.last_turn_only: true trains the last turn only.")
OPENS_THINK_BLOCK = (
    "the chat template's generation prompt opens a think block ('<think>\\n') that its assistant turns never show "
    "(DeepSeek-R1 distills strip the reasoning from every turn): tunelab trains the last turn as the continuation "
    "of that prompt: the record's reasoning (none where it has none), '\\n</think>\\n\\n', the reply and the end of "
    "turn; earlier turns train as the conversation shows them (the reply and the end of turn).")


def reasoning_of(message: dict[str, str]) -> str:
    """An assistant turn's reasoning: its reasoning_content, else a <think>...</think> prefix of its content (the
    rule Qwen3's template applies)."""
    if "reasoning_content" in message:
        return message["reasoning_content"]
    content = message["content"]
    if THINK_CLOSE not in content:
        return ""
    return content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")


def reply_of(message: dict[str, str]) -> str:
    """An assistant turn's content without a think prefix."""
    content = message["content"]
    return content.split(THINK_CLOSE)[-1].lstrip("\n") if THINK_CLOSE in content else content


@dataclass
class LastTurn:
    span: tuple[int, int]  # in the template's rendering of the whole conversation
    generation_start: int  # where the model starts generating, in the rendered text (after any think block added)
    rewritten: bool  # the template renders this turn otherwise once a later turn follows
    think_block: tuple[int, str] | None = None  # (where, what): the generation prompt's think block, closed


def _last_turn(render: Any, tokenizer: Any, messages: list[dict[str, str]], i: int, full: str, source: str) -> LastTurn:
    """The last trained turn: from the end of the generation prompt (in the run's thinking mode) to its end of turn."""
    prompt = render(messages[:i], True)
    block = None
    if full.startswith(prompt):
        start = len(prompt)
    else:
        start = _opened_think_block(prompt, full, messages[i], source)
        block = (start, prompt[start:] + reasoning_of(messages[i]).strip("\n") + "\n" + THINK_CLOSE + "\n\n")
    upto, rewritten = _turn_text(render, tokenizer, messages[: i + 1], start)
    if not full.startswith(upto) or start > len(upto):
        raise DataError(f"{source}: the chat template renders the conversation's last assistant turn differently "
                        "when it is the whole conversation, so the turn cannot be located. Set data.chat_template to "
                        "a prefix-stable template.")
    generation_start = len(prompt) if block else start
    return LastTurn((start, len(upto)), generation_start, rewritten, block)


def _opened_think_block(prompt: str, full: str, message: dict[str, str], source: str) -> int:
    """Where the generation prompt's opening of a think block begins, for a template whose generation prompt opens
    one that its rendered assistant turn lacks; anything else cannot be trained and is refused."""
    k = prompt.rfind(THINK_OPEN)
    if k >= 0 and prompt[k:].strip() == THINK_OPEN and full.startswith(prompt[:k]):
        return k
    if k >= 0 and THINK_CLOSE in prompt[k:] and reasoning_of(message):
        raise DataError(f"{source}: the assistant turn carries reasoning, but with data.enable_thinking: false the "
                        f"chat template's generation prompt closes an empty think block ({prompt[k:]!r}), so the "
                        "model would never be asked to write reasoning. Set data.enable_thinking: true, or remove "
                        "the reasoning from the data.")
    raise DataError(f"{source}: the chat template's generation prompt ends with {prompt[-40:]!r}, which is not how it "
                    "renders the assistant turn that follows, so the tokens the model must generate cannot be "
                    "located. Set data.chat_template to a template whose generation prompt starts its assistant turns.")


def _earlier_turn(render: Any, tokenizer: Any, messages: list[dict[str, str]], i: int, full: str, ending: str,
                  source: str) -> tuple[tuple[int, int], bool]:
    """An assistant turn before the last, as the final conversation renders it: its span, and whether the template
    renders it otherwise when it is the last turn (history rewritten)."""
    prompt = render(messages[:i], True)
    k = prompt.rfind(THINK_OPEN)
    if full.startswith(prompt):
        start = len(prompt)
    elif k >= 0 and full.startswith(prompt[:k]):  # history shows no think block where the generation prompt has one
        start = k
    else:
        start = _opened_think_block(prompt, full, messages[i], source)
    upto, _ = _turn_text(render, tokenizer, messages[: i + 1], start)
    if full.startswith(upto) and start <= len(upto):
        return (start, len(upto)), False
    # the turn as history: up to the end of turn the last turn ends with, before the next message's content
    continued = render([*messages[: i + 1], {"role": "user", "content": CONTINUE}], False)
    boundary = _common_token_prefix(tokenizer, full, continued)
    end = full.rfind(ending, start, boundary) if ending else -1
    if end < 0:
        raise DataError(f"{source}: the chat template renders earlier assistant turns differently once later turns "
                        f"follow, and the end of turn {ending!r} of its last turn is not found after messages[{i}], "
                        "so the turn cannot be located. Set data.chat_template to a prefix-stable template.")
    return (start, end + len(ending)), True


def _end_of_turn(trained: str, reply: str) -> str:
    """What the template writes after a reply to end the turn (its end-of-turn token), from a trained turn's text."""
    reply = reply.strip()
    return trained[trained.rindex(reply) + len(reply):] if reply and reply in trained else ""


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_WARNED: set[str] = set()  # templates whose generation blocks and rendered turns were found to differ (logged once)


def _generation_spans(template: str, messages: list[dict[str, str]], tokenizer: Any, full: str,
                      source: str, enable_thinking: bool) -> list[tuple[int, int]] | None:
    """The character spans of the template's `{% generation %}` blocks (transformers' own renderer records them),
    or None when the template has none."""
    if not GENERATION_BLOCK.search(template):
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, spans = render_jinja_template([messages], chat_template=template, return_assistant_tokens_mask=True,
                                                enable_thinking=enable_thinking,
                                                **getattr(tokenizer, "special_tokens_map", {}))
    except Exception as exc:  # Jinja raises many types
        raise DataError(f"{source}: the chat template failed on this conversation: {exc}") from None
    if rendered[0] != full or not spans[0]:
        return None
    return [tuple(span) for span in spans[0]]


CONTINUE = "\u2063"  # a user turn that continues a conversation (invisible, not whitespace)


def _common_token_prefix(tokenizer: Any, text: str, other: str) -> int:
    """The character length of `text`'s longest token prefix that `other` shares."""
    mine = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    theirs = tokenizer(other, add_special_tokens=False)["input_ids"]
    common = 0
    for a, b in zip(mine["input_ids"], theirs):
        if a != b:
            break
        common += 1
    return mine["offset_mapping"][common - 1][1] if common else 0


def _turn_text(render: Any, tokenizer: Any, messages: list[dict[str, str]], start: int) -> tuple[str, bool]:
    """The conversation rendered up to the end of its last (assistant) turn, which begins at `start`: the tokens it
    has in common with the same conversation continued by a user, so that what a template writes only at the very
    end (Phi-3 closes the whole conversation with EOS) is not part of the turn; and whether the continuation
    rewrites the turn itself (Qwen3 drops its think block), in which case the turn is all of its rendering."""
    upto = render(messages, False)
    try:
        more = render([*messages, {"role": "user", "content": CONTINUE}], False)
    except DataError:  # the template refuses a conversation that goes on: the turn is all there is
        return upto, False
    if more.startswith(upto):
        return upto, False
    common = _common_token_prefix(tokenizer, upto, more)
    if common <= start:
        return upto, True
    return upto[:common], False


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
