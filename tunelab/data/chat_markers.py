"""When tunelab's plain `User:`/`Assistant:` fallback may render chat records, and when it must not.

A base model's tokenizer has no chat template, and the fallback gives it a readable one. A chat-tuned model
whose template went missing (a converted or hand-copied folder) is another case: its vocabulary still holds the
special tokens that open its turns (`<|im_start|>`, `<start_of_turn>`, ...), the model answers only in that
format, and training it on the fallback's text would teach a new format while its own markers go unused. That
is refused, naming the template family to set.
"""

from __future__ import annotations

from typing import Any

from tunelab.errors import DataError

# ChatML as Qwen2.5's and SmolLM2's tokenizers write it (without their default system turns and tool branches)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# a special token that opens a turn -> the chat format of the models whose vocabularies hold it
TURN_MARKERS = {
    "<|im_start|>": "ChatML", "<start_of_turn>": "Gemma", "<|start_header_id|>": "Llama 3",
    "<|START_OF_TURN_TOKEN|>": "Command-R", "<|assistant|>": "Phi-3 / Zephyr", "[INST]": "Mistral",
    "<｜Assistant｜>": "DeepSeek", "<|start_of_role|>": "Granite", "<|start|>": "Harmony (gpt-oss)",
}


def turn_markers(tokenizer: Any) -> list[str]:
    """The chat-turn tokens among the tokenizer's added (special) tokens, in TURN_MARKERS' order."""
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return [m for m in TURN_MARKERS if m in added]


def check_fallback_allowed(tokenizer: Any, source: str) -> None:
    """Raise DataError when chat records would be rendered with the fallback template for a tokenizer whose
    vocabulary marks chat turns of its own (the model's template is missing, not absent by design)."""
    markers = turn_markers(tokenizer)
    if not markers:
        return
    family = TURN_MARKERS[markers[0]]
    where = getattr(tokenizer, "name_or_path", "") or "the model folder"
    hint = (f" For ChatML that is: {CHATML!r} (add the model's own default system turn if it has one)."
            if family == "ChatML" else "")
    raise DataError(f"{source}: chat records need a chat template, and the tokenizer of '{where}' has none, but its "
                    f"vocabulary holds the chat-turn token {markers[0]}: the model was tuned on {family} turns, and "
                    "tunelab's plain User:/Assistant: fallback would teach it another format. Set data.chat_template "
                    f"to the model's {family} template, or put the template back into the folder (chat_template.jinja "
                    f"or tokenizer_config.json's chat_template, from where the model was published).{hint}")
