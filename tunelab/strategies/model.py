"""The model as training sees it: a causal LM, possibly wrapped by peft, that yields hidden states.

Training never needs full logits, only the decoder's last hidden states at target positions and
the output head. Soft prompts (prompt tuning, P-tuning) are inserted here, at the virtual-token
slots that batching reserves in front of every example, so that they work in packed rows too
(peft would prepend them to each row only). Prefix tuning goes through peft's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.models.attention import packed_inputs, packing_refusal
from tunelab.models.head import OutputHead, target_positions
from tunelab.models.load import cache_argument


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.4g}%)"


def count_parameters(model: torch.nn.Module) -> ParamCount:
    params = list(model.parameters())  # shared (tied) tensors appear once
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


class TrainModel(torch.nn.Module):
    """Wraps the (possibly peft) model: `hidden_states(batch)` and `head` are all the loss needs."""

    def __init__(self, lm: Any, strategy: str, virtual_tokens: int = 0, prefix: bool = False):
        super().__init__()
        self.lm = lm  # a transformers causal LM or a peft.PeftModel around one
        self.strategy = strategy
        self.virtual_tokens = virtual_tokens  # slots reserved per example (prompt tuning, P-tuning)
        self.prefix = prefix  # prefix tuning: peft's forward supplies the prefix keys and values
        self.loss_kernel = "chunked"  # the fused head+loss: chunked (tunelab's) or liger (train.loss_kernel)

    @property
    def is_peft(self) -> bool:
        """A peft model around the transformers one (peft also marks the model it injects LoRA layers into with a
        peft_config, which is no wrapper)."""
        return hasattr(self.lm, "peft_config") and hasattr(self.lm, "get_base_model")

    @property
    def base(self) -> Any:
        """The transformers model (with LoRA layers injected, for LoRA)."""
        return self.lm.get_base_model() if self.is_peft else self.lm

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def head(self) -> OutputHead:
        return OutputHead.of(self.base)

    @property
    def pack_refusal(self) -> str | None:
        """Why this model cannot see packed rows (None: it can)."""
        if self.prefix:
            return "prefix tuning's keys and values are laid out per row, not per packed example"
        return packing_refusal(self.base)

    @property
    def can_pack(self) -> bool:
        return self.pack_refusal is None

    def forward(self, batch: dict[str, torch.Tensor], chunk_size: int = 1024,
                count_correct: bool = False) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(summed next-token loss over the target tokens, their number, argmax hits or None).

        The whole loss runs inside this forward, so that DDP and FSDP see every parameter use.
        """
        at = target_positions(*self.hidden_states(batch))
        loss, correct = self.head.cross_entropy_sum(at, chunk_size, count_correct, self.loss_kernel)
        return loss, int(at.targets.shape[0]), correct

    def soft_prompt(self) -> torch.Tensor:
        """The virtual-token embeddings, (virtual_tokens, hidden)."""
        return self.lm.get_prompt(batch_size=1)[0]

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden states (batch, seq, d) and the labels aligned with them (batch, seq)."""
        labels = batch["labels"]
        if self.prefix:
            return self._peft_forward_hidden(batch), labels
        if "position_ids" in batch:
            inputs = packed_inputs(batch, self.config._attn_implementation)
            labels = labels.reshape(inputs["input_ids"].shape)
        else:
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "virtual_mask")}
        if self.virtual_tokens:
            ids = inputs.pop("input_ids")
            inputs["inputs_embeds"] = self._embed_with_prompt(ids, batch["virtual_mask"].reshape(ids.shape))
        hidden = self.base.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return hidden, labels

    def _embed_with_prompt(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Token embeddings (batch, seq, d) of `ids`, with the soft prompt's vectors in the `slots` (batch, seq),
        one whole prompt per run of virtual_tokens slots."""
        embeds = self.base.get_input_embeddings()(ids)
        prompts = self.soft_prompt().to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], prompts.repeat(int(slots.sum()) // self.virtual_tokens, 1))

    def generate_new_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
                            ) -> torch.Tensor:
        """transformers' generate on the base model from left-padded prompts; returns the new tokens (batch, new).

        A soft prompt enters as in training: prompt tuning and P-tuning as embeddings in slots before each row's
        tokens (positions 0..virtual-1, the tokens after them; left padding sits between), a prefix as the KV cache
        every layer attends to first. peft's own generate gets positions wrong after the first new token under
        transformers 5, and drops a prefix altogether."""
        width, mask = input_ids.shape[1], attention_mask
        if self.prefix or self.virtual_tokens:
            virtual = self.lm.peft_config[self.lm.active_adapter].num_virtual_tokens
            ones = torch.ones((mask.shape[0], virtual), dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
            if self.prefix:
                kwargs[cache_argument(self.base)] = self.lm.get_prompt(batch_size=input_ids.shape[0])
            else:
                input_ids = torch.cat([torch.full_like(ones, kwargs.get("pad_token_id") or 0, dtype=input_ids.dtype),
                                       input_ids], dim=1)
                slots = torch.zeros_like(input_ids, dtype=torch.bool)
                slots[:, :virtual] = True
                kwargs["inputs_embeds"] = self._embed_with_prompt(input_ids, slots)
                width += virtual
        return self.base.generate(input_ids=input_ids, attention_mask=mask, **kwargs)[:, width:]

    def _peft_forward_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}
        hook = self.base.get_decoder().register_forward_hook(
            lambda module, args, output: captured.__setitem__("hidden", output.last_hidden_state))
        try:  # logits_to_keep=1: the head runs on one position only; the loss uses the hidden states
            self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
        finally:
            hook.remove()
        return captured["hidden"]
