"""A request's prompt, rendered as its run's training data was: data/'s rendering through evaluate/'s `Inputs` and
`Conversation` (the path `tunelab generate` and `tunelab chat` take), tokenized as `tunelab generate` does.

/v1/completions: the prompt fills the training data's prompt field (a user turn for chat data), as
`tunelab generate --prompt TEXT`. /v1/chat/completions: chat-shaped runs render the messages through the run's chat
template (system turn and earlier turns included); runs trained on a discrete template render earlier turns as that
template's demonstrations, as `tunelab chat` does."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.records import Example
from tunelab.errors import TunelabError
from tunelab.evaluate.chat import Conversation
from tunelab.evaluate.generate import encode_prompts
from tunelab.evaluate.inputs import PLACEHOLDER
from tunelab.serve.pool import Served
from tunelab.serve.protocol import ApiError, ChatRequest, CompletionRequest, Message

DEFAULT_MAX_TOKENS = 256


@dataclass
class Prompt:
    text: str
    ids: list[int]
    max_tokens: int


def _roles(messages: list[Message]) -> list[tuple[str, str]]:
    return [("system" if m.role == "developer" else m.role, m.text) for m in messages]


def _conversation(served: Served, messages: list[tuple[str, str]]) -> str:
    """A discrete-template run: an optional system text, then alternating user/assistant turns ending with a user's."""
    system = "\n".join(text for role, text in messages if role == "system")
    turns = [(r, t) for r, t in messages if r != "system"]
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(turns))]
    if [r for r, _ in turns] != expected or len(turns) % 2 == 0:
        raise ApiError(400, "this model was trained on a discrete template: 'messages' must alternate user and "
                            "assistant turns (after any system message) and end with a user turn.", "messages")
    conv = Conversation(served.inputs, served.em.tokenizer, system)
    conv.turns = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return conv.prompt(turns[-1][1])


def chat_text(served: Served, messages: list[Message]) -> str:
    """The text the model continues for a chat request."""
    pairs = _roles(messages)
    if pairs[-1][0] != "user":
        raise ApiError(400, f"the last message must be the user's (got '{pairs[-1][0]}'): the model answers it.",
                       "messages")
    if served.inputs.shape != "chat":
        return _conversation(served, pairs)
    turns = [{"role": r, "content": t} for r, t in pairs] + [{"role": "assistant", "content": PLACEHOLDER}]
    return served.inputs.prompts([Example("chat", {"messages": turns}, "request", 1)], served.em.tokenizer)[0]


def completion_text(served: Served, prompt: str) -> str:
    """The text the model continues for a completions request (as `tunelab generate --prompt`)."""
    return served.inputs.prompts(served.inputs.from_texts([prompt]), served.em.tokenizer)[0]


def render(served: Served, request: ChatRequest | CompletionRequest) -> Prompt:
    """The request's prompt text, its ids, and its max_tokens checked against the context."""
    try:
        text = chat_text(served, request.messages) if isinstance(request, ChatRequest) else \
            completion_text(served, request.prompt_text)
    except TunelabError as exc:  # a rendering the run's template refuses (a chat template's own check, ...)
        raise ApiError(400, f"cannot render this request as '{served.name}' was trained: {exc}", "messages") from None
    ids = encode_prompts(served.em.tokenizer, [text])[0]
    return Prompt(text, ids, _max_tokens(served, len(ids), request.requested_tokens))


def _max_tokens(served: Served, prompt_len: int, requested: int | None) -> int:
    context, virtual = served.context_length, served.virtual_tokens
    room = context - prompt_len - virtual
    if room <= 0:
        raise ApiError(400, f"the prompt is {prompt_len} tokens{f' (+{virtual} soft-prompt tokens)' if virtual else ''}"
                            f", but '{served.name}' has a context of {context} tokens: shorten the messages.",
                       "messages", code="context_length_exceeded")
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if requested < 1 or requested > room:
        raise ApiError(400, f"max_tokens must be between 1 and {room} (the context of {context} tokens less the "
                            f"prompt's {prompt_len + virtual}); got {requested}.", "max_tokens")
    return requested
