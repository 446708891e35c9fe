"""Variable-length attention for packed rows: each packed example attends only to itself.

`tunelab_varlen` runs PyTorch's SDPA once per packed example (causal, no mask), so no
(tokens x tokens) mask is built and no attention is spent across example boundaries; on a GPU
each call takes SDPA's flash kernel. Without example bounds (padded batches, evaluation,
generation) it is exactly transformers' SDPA attention with its usual masks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "tunelab_varlen"
BOUNDS_KWARG = "tunelab_doc_bounds"  # start offsets of the packed examples, plus the total length
# A 4-d mask that transformers passes through untouched, so that it builds no dense mask for packed rows.
NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # under the CPU's bf16 autocast, SDPA in float32: its CPU kernels' bf16 backward took 5x as long (SmolLM2)
        with torch.autocast("cpu", enabled=False):
            return varlen_attention(module, query.float(), key.float(), value.float(), attention_mask, dropout,
                                    scaling, **kwargs)
    bounds: list[int] | None = kwargs.pop(BOUNDS_KWARG, None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query (1, heads, tokens, head_dim); key, value (1, kv_heads, tokens, head_dim)
    n_rep = query.shape[1] // key.shape[1]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        k = repeat_kv(key[:, :, start:end], n_rep)
        v = repeat_kv(value[:, :, start:end], n_rep)
        outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], k, v, is_causal=True,
                                                      dropout_p=dropout, scale=scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, tokens, heads, head_dim)


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, sdpa_mask)


# Up to this row length a block-diagonal mask through SDPA is cheaper than one SDPA call per example
# (short rows hold many short examples, and per-call overhead dominates on the CPU).
DENSE_MASK_MAX_ROW = 1024


def block_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(rows, 1, L, L) boolean mask: causal within each packed example, nothing across examples."""
    doc = (positions == 0).cumsum(-1)  # (rows, L): the example each token belongs to
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool, device=positions.device).tril()
    return (same & causal)[:, None]


def packing_refusal(model: Any) -> str | None:
    """Why packed rows would not stay apart in this model, or None when they do: an architecture whose attention
    does not go through transformers' attention interface (and masks) ignores the restarting position ids."""
    if not getattr(type(model), "_supports_attention_backend", False):
        return (f"'{model.config.model_type}' models compute attention their own way, not through transformers' "
                "attention interface, so packed examples would attend to each other")
    return None


def packed_inputs(batch: dict[str, torch.Tensor], attn_implementation: str) -> dict[str, Any]:
    """Model inputs for a packed batch (input_ids, position_ids), laid out for the attention in use.

    For `tunelab_varlen`, short rows get a block-diagonal causal mask (built once, shared by all
    layers); long rows are flattened into one sequence and attended one example at a time, the
    example bounds read from the restarting position ids.
    """
    if attn_implementation == VARLEN and batch["input_ids"].shape[1] <= DENSE_MASK_MAX_ROW:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "attention_mask": block_causal_mask(batch["position_ids"])}
    ids = batch["input_ids"].reshape(1, -1)
    positions = batch["position_ids"].reshape(1, -1)
    inputs: dict[str, Any] = {"input_ids": ids, "position_ids": positions}
    if attn_implementation == VARLEN:
        starts = (positions[0] == 0).nonzero().flatten().tolist()
        inputs[BOUNDS_KWARG] = [*starts, positions.shape[1]]
        inputs["attention_mask"] = NO_MASK.to(ids.device)
    elif not attn_implementation.startswith("flash"):
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}  # dense mask per row
    return inputs
