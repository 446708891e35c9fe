"""Runs llama.cpp's converter (`python -m tunelab.export.convert_launch CONVERTER ARGS...`) as its own script, with
the config keys it reads that transformers 5 no longer returns put back beside their new form.

The converter reads a model's hyperparameters through `AutoConfig.from_pretrained(...).to_dict()`. transformers 5
folds GPT-NeoX's `rotary_pct` and `rotary_emb_base` into `rope_parameters` (and drops them from a config.json that
still has them), while the converter of llama-cpp-python's release indexes `rotary_pct`. Nothing of the converter is
changed: its input gets the keys it was written for, with the values transformers holds."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any


def _with_legacy_rope_keys(to_dict: Any) -> Any:
    def legacy(config: Any) -> dict[str, Any]:
        values = to_dict(config)
        rope = values.get("rope_parameters") or {}
        values.setdefault("rotary_pct", rope.get("partial_rotary_factor", 1.0))
        values.setdefault("rotary_emb_base", rope.get("rope_theta", 10000.0))
        return values

    return legacy


def main(argv: list[str]) -> None:
    from transformers import GPTNeoXConfig

    GPTNeoXConfig.to_dict = _with_legacy_rope_keys(GPTNeoXConfig.to_dict)
    script = Path(argv[0])
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
