"""`tunelab chat`: talk to a tuned run, each turn rendered exactly as its training data was (or to a plain model,
each turn rendered with its own chat template).

Chat-shaped runs render the whole conversation (system prompt, earlier turns, the new user turn)
through the run's chat template; runs trained on a discrete template render each earlier turn as
that template renders a demonstration (prompt and answer, joined by its demo separator), then the
new input. The reply streams as it is generated (transformers' TextStreamer). Commands: /reset,
/system TEXT, /quit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

from tunelab.data.records import SHAPES, Example
from tunelab.evaluate.generate import generate
from tunelab.evaluate.inputs import PLACEHOLDER, Inputs
from tunelab.evaluate.loaders import EvalModel

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit"


@dataclass
class Conversation:
    inputs: Inputs
    tokenizer: Any
    system: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)

    def prompt(self, user: str) -> str:
        """The text the model continues for the next reply."""
        if self.inputs.shape == "chat":
            messages = [{"role": "system", "content": self.system}] if self.system else []
            for u, a in self.turns:
                messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": PLACEHOLDER}]
            return self.inputs.prompts([Example("chat", {"messages": messages}, "chat", len(self.turns))],
                                       self.tokenizer)[0]
        eos = self.tokenizer.eos_token or ""
        past = []
        for u, a in self.turns:
            ex = self.inputs.from_texts([u])[0]
            ex.fields[SHAPES[ex.shape][2]] = a
            past.append(self.inputs.render(ex, self.tokenizer).text.removesuffix(eos))
        now = self.inputs.prompts(self.inputs.from_texts([user]), self.tokenizer)[0]
        separator = self.inputs.spec.template.demo_separator if self.inputs.spec.template else "\n\n"
        return separator.join([*([self.system] if self.system else []), *past, now])


def chat_loop(em: EvalModel, inputs: Inputs, stdin: IO[str], stdout: IO[str], max_new_tokens: int = 128,
              do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
              show_prompt: bool = False, system: str = "", stop_strings: list[str] | None = None) -> int:
    """Read user turns from `stdin` until /quit or end of input; returns the number of replies."""
    from transformers import TextStreamer

    class _Out(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    conv = Conversation(inputs, em.tokenizer, system)
    stdout.write(f"tunelab chat: {em.name}. {HELP}\n")
    replies = 0
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return replies
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            conv.turns.clear()
            stdout.write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            conv.system = text[len("/system"):].strip()
            stdout.write(f"(system prompt: {conv.system or 'none'})\n")
            continue
        if not text.strip():
            continue
        prompt = conv.prompt(text)
        if show_prompt:
            stdout.write(f"[prompt] {prompt!r}\n")
        streamer = _Out(em.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate(em, [prompt], max_new_tokens, do_sample, temperature, top_p, stop_strings, seed=seed + replies,
                         streamer=streamer)[0]
        conv.turns.append((text, reply.text.strip()))
        replies += 1
