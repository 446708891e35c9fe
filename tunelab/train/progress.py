"""The progress bar: loss, learning rate, tokens/s and ETA (tqdm computes the ETA)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5)

    def update(self, row: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                             refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
