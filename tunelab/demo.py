"""The built-in demo: the smallest honest fine-tuning run that needs no download.

It converts the real pretrained stories260K model (llama2.c) from ../shared/data, fine-tunes it on
banking77 (customer message -> intent) and shows the held-out loss before and after.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.config import validate_config
from tunelab.errors import TunelabError
from tunelab.train.loop import train
from tunelab.train.metrics import read_metrics

SHARED_CANDIDATES = (Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data")


def find_shared_data() -> Path:
    for candidate in SHARED_CANDIDATES:
        if (candidate / "stories260K" / "stories260K.bin").is_file():
            return candidate.resolve()
    raise TunelabError("the demo needs the shared data folder (../shared/data with stories260K and banking77) "
                       "beside the checkout; it was not found.")


def run_demo(out: Path = Path("runs/demo"), steps: int = 300) -> dict[str, float]:
    from tunelab.models.llama2c import convert_llama2c

    shared = find_shared_data()
    model_dir = out / "stories260K"
    if not (model_dir / "model.safetensors").is_file():
        convert_llama2c(shared / "stories260K/stories260K.bin", shared / "stories260K/tok512.bin", model_dir)
        print(f"converted llama2.c stories260K to {model_dir}")
    cfg = validate_config({
        "model": {"path": str(model_dir)},
        "data": {"train": str(shared / "banking77/train.csv"), "eval": str(shared / "banking77/test.csv"),
                 "columns": {"label": "category"}, "max_length": 96, "max_examples": 4000,
                 "max_eval_examples": 500},
        "strategy": {"name": "full", "template": {"prompt": "{text}\nIntent:", "target": " {label}"}},
        "train": {"max_steps": steps, "learning_rate": 3e-3, "batch_size": 16, "warmup_steps": 10,
                  "eval_every": max(1, steps // 2), "seed": 0},
        "output_dir": str(out / "banking77-full"),
        "overwrite": True,
    })
    result = train(cfg)
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["type"] == "eval"]
    before, after = evals[0], evals[-1]
    print(f"\nbanking77 held-out ({after['eval_num_label_tokens']} intent tokens of 500 test questions):")
    print(f"  base model     eval loss {before['eval_loss']:.3f}   token accuracy {before['eval_token_accuracy']:.3f}")
    print(f"  after {result.steps} steps eval loss {after['eval_loss']:.3f}   token accuracy {after['eval_token_accuracy']:.3f}")
    print(f"  the fine-tuned model is in {result.final_dir}")
    return {"base_eval_loss": before["eval_loss"], "tuned_eval_loss": after["eval_loss"]}
