"""Does the exported GGUF answer as the tuned model does? Checked in llama.cpp's own runtime (llama-cpp-python).

For each held-out input: llama.cpp renders the prompt from the GGUF's own chat template (as llama-cpp-python's
chat completion does: Jinja over the file's `tokenizer.chat_template`, tokenized with special tokens parsed) and
those ids must equal the ids tunelab trained on for the same conversation; then both generate greedily, llama.cpp
stopping only where its vocabulary marks an end of generation (no stop strings), and the new tokens are compared
token for token. Where they first differ, tunelab's margin between its two best logits there says whether it was
a near tie (a rounding of 16-bit weights can flip a tie, and nothing else).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

NEAR_TIE = 0.05  # logits closer than this at a step: f16 rounding may flip the choice
BF16_FILE_TYPE = 32  # llama.cpp's general.file_type of a bf16 file (LLAMA_FTYPE_MOSTLY_BF16)


def near_tie(file_type: int | None) -> float:
    """The margin under which a file's rounding of the weights may flip a greedy choice: NEAR_TIE for f16 (and the
    finer f32), 8x that for bf16, which keeps 8 significant bits to f16's 11 and so moves logits 8x as far."""
    return NEAR_TIE * 2 ** 3 if file_type == BF16_FILE_TYPE else NEAR_TIE


@dataclass
class PromptParity:
    prompt_ids_equal: bool
    tunelab_prompt: list[int]
    llama_prompt: list[int]
    tunelab_new: list[int]  # greedy new tokens, up to and including the end of turn
    llama_new: list[int]
    margins: list[float]  # tunelab's top-1 minus top-2 logit at each of its steps
    llama_stopped: bool  # llama.cpp ended at an end-of-generation token of its own accord
    tunelab_stopped: bool
    same_top: int = -1  # positions of tunelab's answer where llama.cpp, given tunelab's tokens so far, chose the same

    @property
    def first_difference(self) -> int | None:
        pairs = zip(self.tunelab_new, self.llama_new)
        diff = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if diff is None and len(self.tunelab_new) != len(self.llama_new):
            diff = min(len(self.tunelab_new), len(self.llama_new))
        return diff

    @property
    def margin_at_difference(self) -> float | None:
        diff = self.first_difference
        return self.margins[diff] if diff is not None and diff < len(self.margins) else None

    @property
    def agreeing(self) -> int:
        """Positions where both chose the same token (over the longer of the two generations)."""
        return sum(a == b for a, b in zip(self.tunelab_new, self.llama_new))

    @property
    def length(self) -> int:
        return max(len(self.tunelab_new), len(self.llama_new))


@dataclass
class ParityReport:
    gguf: Path
    rows: list[PromptParity] = field(default_factory=list)
    near_tie: float = NEAR_TIE  # the margin under which the file's rounding may flip a greedy choice (near_tie())

    @property
    def prompt_ids_equal(self) -> bool:
        return all(r.prompt_ids_equal for r in self.rows)

    @property
    def exact(self) -> int:
        return sum(r.first_difference is None for r in self.rows)

    @property
    def token_agreement(self) -> float:
        return sum(r.agreeing for r in self.rows) / max(1, sum(r.length for r in self.rows))

    @property
    def same_top(self) -> float:
        """The share of tunelab's answer tokens that llama.cpp ranks first when fed the same tokens before them
        (teacher-forced, as llama.cpp's own `perplexity --kl-divergence` reports "Same top p"): unlike
        token_agreement, one early flip does not count every later position of that answer as a miss."""
        return sum(r.same_top for r in self.rows) / max(1, sum(len(r.tunelab_new) for r in self.rows))

    def near_ties(self) -> list[tuple[int, float]]:
        """(row, margin) of each differing row whose first difference was a near tie for tunelab."""
        return [(i, r.margin_at_difference) for i, r in enumerate(self.rows)
                if r.margin_at_difference is not None and r.margin_at_difference < self.near_tie]

    def summary(self) -> str:
        differing = [(i, r.margin_at_difference) for i, r in enumerate(self.rows) if r.first_difference is not None]
        stopped = sum(r.llama_stopped for r in self.rows)
        text = (f"{self.gguf.name}: prompt ids {'equal' if self.prompt_ids_equal else 'DIFFER'} on "
                f"{sum(r.prompt_ids_equal for r in self.rows)}/{len(self.rows)}; greedy output identical on "
                f"{self.exact}/{len(self.rows)}, token agreement {self.token_agreement:.1%}, same top token "
                f"{self.same_top:.1%}; llama.cpp stopped at the "
                f"end of turn on {stopped}/{len(self.rows)} (tunelab {sum(r.tunelab_stopped for r in self.rows)})")
        if differing:
            text += "; first differences (row: tunelab's top-2 margin) " + ", ".join(
                f"{i}: {m:.4f}" if m is not None else f"{i}: length" for i, m in differing)
        return text


GREEDY_BATCH = 16  # prompts decoded together (tunelab generate's default batch)


def tunelab_greedy(em: Any, prompt_ids: list[list[int]], max_new_tokens: int
                   ) -> list[tuple[list[int], list[float], bool]]:
    """tunelab's own greedy continuation of each prompt (as `tunelab generate` runs it: left-padded batches, the
    run's end ids), cut after its first end id, and the margin between its two best logits at each step (from one
    forward pass over the prompt and its answer, unpadded on the left so that positions are the prompt's own)."""
    from tunelab.evaluate.generate import decoding, generate_batch

    dec = decoding(em, max_new_tokens)
    out: list[tuple[list[int], list[float], bool]] = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), GREEDY_BATCH):
            chunk = prompt_ids[start:start + GREEDY_BATCH]
            for ids, new in zip(chunk, generate_batch(em, chunk, dec).tolist()):
                ends = [k for k, t in enumerate(new) if t in dec.stop_ids]
                new = new[: ends[0] + 1] if ends else new
                out.append((new, _margins(em, ids, new), bool(ends)))
    return out


def _margins(em: Any, prompt_ids: list[int], new: list[int]) -> list[float]:
    """The top-1 minus top-2 logit where each of `new` was chosen after `prompt_ids`."""
    full = torch.tensor([prompt_ids + new])
    logits = em.model.lm(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float()  # (seq, vocab)
    top2 = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(new)].topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def llama_greedy(llm: Any, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """llama.cpp's greedy continuation, ended only by a token its vocabulary marks as an end of generation
    (the end token is included)."""
    import llama_cpp
    import numpy as np

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        new.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return new, True
        llm.eval([token])
    return new, False


def llama_same_top(llm: Any, prompt_ids: list[int], tokens: list[int], start: int) -> int:
    """How many of `tokens` (tunelab's answer) llama.cpp ranks first when fed the prompt and tunelab's tokens before
    each; the first `start` are known to agree (llama.cpp generated them greedily)."""
    import llama_cpp
    import numpy as np

    if start >= len(tokens):
        return len(tokens)
    llm.reset()
    llm.eval(prompt_ids + tokens[:start])
    same = start
    for k in range(start, len(tokens)):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        same += int(np.argmax(logits)) == tokens[k]
        if k + 1 < len(tokens):
            llm.eval([tokens[k]])
    return same


def llama_chat_prompt(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids llama-cpp-python's chat completion makes from the GGUF's own chat template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode() if token >= 0 else ""

    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=text(llm.token_eos()),
                                    bos_token=text(llm.token_bos()), add_generation_prompt=True)
    result = formatter(messages=messages)
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


@contextmanager
def _without_weight_repacking() -> Iterator[None]:
    """llama.cpp's `--no-repack` (model parameter use_extra_bufts off), which llama-cpp-python's Llama does not take
    as an argument: its CPU kernels on the file's own layout. The repacked AMX q8_0 kernels of llama.cpp at
    llama-cpp-python 0.3.36 crash (SIGSEGV in decode) on a CPU with AMX, as this project's machine has."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params() -> Any:
        values = default()
        values.use_extra_bufts = False
        return values

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def open_gguf(gguf: Path, n_ctx: int = 1024) -> Any:
    """The file in llama.cpp's runtime, on the CPU, without weight repacking."""
    from llama_cpp import Llama

    threads = max(1, torch.get_num_threads())  # prompts too (llama-cpp-python's default takes every core for them)
    with _without_weight_repacking():
        return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


@dataclass
class TunelabAnswer:
    """tunelab's side of one held-out input: its prompt ids and greedy answer (the same for every file checked)."""

    prompt: list[int]
    new: list[int]
    margins: list[float]
    stopped: bool


def tunelab_answers(em: Any, prompts: list[str], max_new_tokens: int = 32) -> list[TunelabAnswer]:
    """tunelab's prompt ids and greedy answers for `prompts`: computed once, checked against any number of files."""
    from tunelab.evaluate.generate import encode_prompts

    ids = encode_prompts(em.tokenizer, prompts)
    return [TunelabAnswer(p, *answer) for p, answer in zip(ids, tunelab_greedy(em, ids, max_new_tokens))]


def check_parity(em: Any, gguf: Path, conversations: list[list[dict[str, str]]] | None, prompts: list[str],
                 max_new_tokens: int = 32, answers: list[TunelabAnswer] | None = None) -> ParityReport:
    """Compare the GGUF in llama.cpp with the tuned model `em` (tunelab.evaluate.loaders.EvalModel) on held-out
    inputs: `prompts` are tunelab's renderings; `conversations` the same inputs as messages (a chat-template run),
    or None where the run used a discrete template (llama.cpp is then given the rendered text). `answers`:
    tunelab_answers of the same prompts and max_new_tokens, where several files are checked against one run."""
    answers = answers or tunelab_answers(em, prompts, max_new_tokens)
    llm = open_gguf(Path(gguf))
    try:
        file_type = llm.metadata.get("general.file_type")
        report = ParityReport(Path(gguf), near_tie=near_tie(int(file_type) if file_type is not None else None))
        for i, (prompt, ours) in enumerate(zip(prompts, answers, strict=True)):
            if conversations is not None:
                theirs = llama_chat_prompt(llm, conversations[i])
            else:
                theirs = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            llama_new, llama_stopped = llama_greedy(llm, theirs, max_new_tokens)
            row = PromptParity(ours.prompt == theirs, ours.prompt, theirs, ours.new, llama_new, ours.margins,
                               llama_stopped, ours.stopped)
            row.same_top = llama_same_top(llm, theirs, ours.new, row.first_difference if row.first_difference
                                          is not None else len(ours.new))  # only where the answers parted
            report.rows.append(row)
        return report
    finally:
        llm.close()


def held_out_inputs(em: Any, path: str) -> tuple[list[str], list[list[dict[str, str]]] | None]:
    """The records of `path` rendered as the run renders them (`tunelab generate --input-file`), and, for a run
    that rendered through a chat template, each as the conversation before its last assistant turn."""
    from tunelab.evaluate.inputs import Inputs

    inputs = Inputs(em.run_config)
    examples = inputs.from_file(path)
    prompts = inputs.prompts(examples, em.tokenizer)
    chat = inputs.shape == "chat" and inputs.spec.mode in ("auto", "chat")
    return prompts, [ex.fields["messages"][:-1] for ex in examples] if chat else None


def run_parity(run_dir: Path, gguf: Path, input_file: str, max_new_tokens: int = 32) -> ParityReport:
    """check_parity of a run (loaded as `tunelab eval` loads it, on the CPU in float32) on a held-out file."""
    from tunelab.evaluate.loaders import load_for_eval

    em = load_for_eval(str(run_dir), device="cpu", precision="fp32")
    prompts, conversations = held_out_inputs(em, input_file)
    return check_parity(em, gguf, conversations, prompts, max_new_tokens)
