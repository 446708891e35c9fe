"""`python -m tests.train.step1_grads train CONFIG ...` (also under torchrun): `tunelab train`, and rank 0 saves
every trainable parameter's step-1 gradient, as the update uses it (after clipping; whole tensors, gathered
from FSDP2's shards), to the file named by $TUNELAB_TEST_STEP1_GRADS. A test-only hook: tunelab has no such
option."""

from __future__ import annotations

import os
from typing import Any

import torch

from tunelab.cli import main
from tunelab.train import loop

ENV_KEY = "TUNELAB_TEST_STEP1_GRADS"


def _dumping(real: Any) -> Any:
    done = []

    def accumulate_gradients(model: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(model, *args, **kwargs)
        if not done:
            done.append(True)
            grads = {}
            for name, p in model.named_parameters():  # after the backward: FSDP2 holds the sharded parameters
                if p.grad is not None:  # a trainable parameter without one is missing from the file
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # a collective
                    grads[name.removeprefix("module.")] = g.detach().clone()
            if int(os.environ.get("RANK", "0")) == 0:
                torch.save(grads, os.environ[ENV_KEY])
        return out

    return accumulate_gradients


if __name__ == "__main__":
    loop.accumulate_gradients = _dumping(loop.accumulate_gradients)
    raise SystemExit(main())
