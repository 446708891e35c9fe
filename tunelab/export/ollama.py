"""`--format ollama`: the GGUF plus a Modelfile whose TEMPLATE, in Ollama's Go template syntax, renders the same
text as the chat template the run trained with.

The Go template is derived from the chat template itself, not from a hand-made table of known templates: the
chat template is rendered on marker conversations to find what it writes around each role's content, the
generation prompt, and any default system turn it adds; the Go template writes exactly those pieces. Then both
are rendered on a set of conversations (with and without a system turn, several turns) and must agree, or no
Modelfile is written. A chat template that is not "each message wrapped by its role's fixed text" (one that folds
the system prompt into the first user turn, strips content, or numbers turns) fails that check, with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.gotemplate import render_go_template

ROLES = ("system", "user", "assistant")
_MARK = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01"}
# conversations both templates must render alike (content with spaces, newlines and template-like braces)
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me {a} joke\nplease."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "Where is the gold?"}],
]


@dataclass(frozen=True)
class TurnPieces:
    """What a chat template writes around each message: wrappers[role] = (before, after); `header` before the
    first message; `default_system` where no system message comes first; `generation` the generation prompt."""

    wrappers: dict[str, tuple[str, str]]
    header: str
    default_system: str
    generation: str


def _between(text: str, start: str, end: str) -> str:
    begin = text.index(start) + len(start)
    return text[begin:text.index(end, begin)]


def _renders(render: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str | None:
    """The chat template's text, or None where it refuses the conversation (a template without a system role)."""
    try:
        return render(messages, generation_prompt)
    except Exception:  # Jinja's raise_exception and template errors have many types
        return None


def candidate_pieces(render: Any) -> list[TurnPieces]:
    """The ways to cut marker renderings into pieces, longest user prefix first (a conversation's text alone does
    not say where one message's closing text ends and the next one's opening text begins)."""
    s, u, a = (_MARK[r] for r in ROLES)
    msg = lambda role: {"role": role, "content": _MARK[role]}  # noqa: E731
    conversation = [msg("user"), msg("assistant"), {"role": "user", "content": u + "2"}]
    turns, prompted = render(conversation, False), render(conversation, True)
    # what follows the last user message: its closing text, then the generation prompt (or, in some templates
    # such as Phi-3's, an EOS where there is no generation prompt)
    tail, prompted_tail = turns[turns.rindex(u + "2") + len(u) + 1:], prompted[prompted.rindex(u + "2") + len(u) + 1:]
    closing = os.path.commonprefix([tail, prompted_tail])
    return [pieces for cut in range(len(closing), -1, -1)
            for pieces in _cuts(render, turns, closing[:cut], prompted_tail[cut:])]


def _cuts(render: Any, turns: str, user_after: str, generation: str) -> list[TurnPieces]:
    s, u, a = (_MARK[r] for r in ROLES)
    msg = lambda role: {"role": role, "content": _MARK[role]}  # noqa: E731
    if not _between(turns, u, a).startswith(user_after):
        return []
    assistant_before = _between(turns, u, a)[len(user_after):]
    x, y = _between(turns, a, u + "2"), turns[: turns.index(u)]
    with_system = _renders(render, [msg("system"), msg("user")], False)
    out = []
    for k in range(len(os.path.commonprefix([x[::-1], y[::-1]])), -1, -1):
        user_before, lead = x[len(x) - k:], y[: len(y) - k]
        wrappers = {"user": (user_before, user_after), "assistant": (assistant_before, x[: len(x) - k])}
        header, default_system = lead, ""
        if with_system is not None:
            before_system, system_after = with_system[: with_system.index(s)], _between(with_system, s, u)
            if not system_after.endswith(user_before):
                continue
            header = os.path.commonprefix([before_system, lead])
            if lead.startswith(before_system) and lead != before_system:
                header = ""
            default_system = lead[len(header):]
            wrappers["system"] = (before_system[len(header):], system_after[: len(system_after) - k])
        out.append(TurnPieces(wrappers, header, default_system, generation))
    return out


def _go_text(text: str) -> str:
    """Literal text inside a Go template: only a '{{' would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: TurnPieces) -> str:
    """The Ollama TEMPLATE (one line, no trim markers, so every character of the pieces is kept)."""
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_text(before)}'
                       f"{{{{ .Content }}}}{_go_text(after)}"
                       for i, (role, (before, after)) in enumerate(pieces.wrappers.items()))
    default = (f'{{{{ if ne (index .Messages 0).Role "system" }}}}{_go_text(pieces.default_system)}{{{{ end }}}}'
               if pieces.default_system else "")
    return (f"{_go_text(pieces.header)}{default}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}"
            f"{_go_text(pieces.generation)}")


def check_template(go: str, render: Any) -> None:
    """The Go template renders every check conversation (plus generation prompt) as the chat template does."""
    for messages in CHECK_CONVERSATIONS:
        want = _renders(render, messages, True)
        if want is None and messages[0]["role"] == "system":  # a template without a system role refuses it
            continue
        got = render_go_template(go, {"Messages": messages})
        if want != got:
            raise TunelabError(f"the run's chat template cannot be written as an Ollama template: on the conversation "
                               f"{messages} it renders {want!r}, and the Go template derived from it (each message "
                               f"wrapped by its role's fixed text) renders {got!r}. No Modelfile was written; the GGUF "
                               "is complete and carries the chat template for llama.cpp and LM Studio.")


def _splits(pieces: TurnPieces, special: list[str]) -> int:
    """How many pieces begin or end inside a special token (a cut through '<|user|>' is not where a turn ends)."""
    texts = [t for pair in pieces.wrappers.values() for t in pair] + [pieces.header, pieces.default_system,
                                                                      pieces.generation]
    return sum(any(t.startswith(tok[i:]) or t.endswith(tok[:i]) for tok in special for i in range(1, len(tok)))
               for t in texts if t)


def _unnatural(pieces: TurnPieces, special: list[str]) -> tuple[int, bool, bool]:
    """Sort key, natural cuts first: none through a special token; an assistant message closes as a user message
    does (ChatML's <|im_end|>\n after each), or at least ends the same way; then the order found."""
    user_after, assistant_after = pieces.wrappers["user"][1], pieces.wrappers["assistant"][1]
    return (_splits(pieces, special), assistant_after != user_after,
            not (assistant_after and assistant_after.endswith(user_after)))


def derive_go_template(render: Any, special: list[str] = ()) -> str:
    """The Ollama template of a chat template (`render(messages, generation_prompt) -> str`; `special`: the
    tokenizer's special tokens, where no cut should fall), checked."""
    pieces = sorted(candidate_pieces(render), key=lambda p: _unnatural(p, list(special)))
    candidates = list(dict.fromkeys(go_template(p) for p in pieces))
    if not candidates:
        raise TunelabError("the run's chat template writes a system message's closing text differently from a user "
                           "message's, so it cannot be cut into the per-role pieces an Ollama template is made of. No "
                           "Modelfile was written; the GGUF is complete and carries the chat template.")
    for go in candidates[:-1]:
        try:
            check_template(go, render)
            return go
        except TunelabError:
            continue
    check_template(candidates[-1], render)  # the last cut's mismatch is the one reported
    return candidates[-1]


def fixed_system_prompt(config: Any) -> str | None:
    """The system prompt every training conversation started with, where they all had the same one."""
    from tunelab.data.dataset import load_examples

    if config is None:
        return None
    source = config.data.sources()[0]
    examples = load_examples(source.path, source)
    firsts = {(ex.fields.get("messages") or [{}])[0].get("content") if ex.shape == "chat"
              and (ex.fields.get("messages") or [{}])[0].get("role") == "system" else None for ex in examples}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def modelfile(gguf_name: str, go: str, stops: list[str], system: str | None, sampling: dict[str, Any]) -> str:
    for text, what in ((go, "template"), (system or "", "system prompt")):
        if '"""' in text:
            raise TunelabError(f"the run's {what} contains three double quotes, which end a Modelfile block.")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in sampling.items()]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sampling_defaults(config: Any) -> dict[str, Any]:
    """`tunelab eval`'s generation settings (the run's eval: section) as Ollama parameters."""
    from tunelab.config import EvalConfig

    settings = config.eval if config is not None else EvalConfig()
    sampled = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else \
        {"temperature": 0, "top_k": 1}
    return {**sampled, "num_predict": settings.max_new_tokens}


def discrete_go_template(template: Any) -> str:
    """A discrete template (strategy.template) as an Ollama template over `.Prompt`: its instruction and prompt
    with the one record field it names replaced by the user's text."""
    import string

    fields = [name for _, name, _, _ in string.Formatter().parse(template.prompt) if name is not None]
    if len(fields) != 1:
        raise TunelabError(f"the run's template prompt {template.prompt!r} names {len(fields)} record fields "
                           f"({fields}); an Ollama template has one input (the user's text), so no Modelfile was "
                           "written. The GGUF is complete; pass prompts rendered with the run's template to it.")
    instruction = f"{template.instruction}{template.demo_separator}" if template.instruction else ""
    prompt = template.prompt.replace("{" + fields[0] + "}", "\x00").replace("{{", "{").replace("}}", "}")
    return _go_text(instruction + prompt).replace("\x00", "{{ .Prompt }}")


def strips_content(render: Any) -> bool:
    """Whether the chat template trims the white space around a message's content (Llama 3's `| trim`, Llama 2's
    `.strip()`): a Go template cannot, so such a Modelfile matches for content without edge white space only."""
    return "\u2002x\u2002" not in render([{"role": "user", "content": "\u2002x\u2002"}], True)


def chat_renderer(tokenizer: Any, template: str) -> Any:
    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    return render


def ollama_template(source: Any) -> tuple[str, str | None]:
    """The Modelfile TEMPLATE for a run: derived from (and checked against) the chat template it trained with, or
    made from its discrete template; a TunelabError where neither can be written faithfully. Second: a caveat
    to print, or None."""
    from transformers import AutoTokenizer

    from tunelab.data.render import DEFAULT_TEMPLATES
    from tunelab.export.source import trained_chat_template

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    template = trained_chat_template(source, tokenizer)
    if template is not None:
        render = chat_renderer(tokenizer, template)
        go = derive_go_template(render, [t for t in tokenizer.get_added_vocab() if len(t) > 1])
        return go, ("the chat template trims white space around each message, which an Ollama template cannot: "
                    "the two render alike for messages without leading or trailing white space"
                    if strips_content(render) else None)
    from tunelab.data.table import first_shape

    data = source.config.data.sources()[0]
    discrete = source.config.strategy.template or DEFAULT_TEMPLATES[first_shape(data.path, data)]
    return discrete_go_template(discrete), ("the run used a discrete template, not a chat template: the GGUF carries "
                                            "no chat template, and the Modelfile's TEMPLATE wraps Ollama's prompt in "
                                            "the run's template")


def write_modelfile(out: Path, gguf_name: str, go: str, source: Any, carried: dict[str, Any]) -> Path:
    stops = [carried["turn_end"]] if carried.get("turn_end") else []
    path = out / "Modelfile"
    path.write_text(modelfile(gguf_name, go, stops, fixed_system_prompt(source.config),
                              sampling_defaults(source.config)))
    return path
