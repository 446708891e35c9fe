"""Rebuild the demo's base model from nothing: generate the corpus, train a tokenizer on it, and
pre-train a small Llama-architecture model on it with tunelab itself (plain `text` training).

    python -m tunelab.demo_world.build [--out DIR] [--steps N]

The result (safetensors in bfloat16, tokenizer, config) is what tunelab/demo_world/model holds; it
is committed once and rebuilt only when this recipe changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tunelab.demo_world.corpus import corpus
from tunelab.demo_world.world import build_world

MODEL_DIR = Path(__file__).parent / "model"
SEED = 7
CORPUS_SEED = 1
VOCAB = 2048
ARCH = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=3, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)
PRETRAIN = {
    "data": {"format": "text", "max_length": 256},
    "train": {"tokens_per_step": 8192, "learning_rate": 3e-3, "warmup_steps": 50, "schedule": "cosine",
              "min_lr_ratio": 0.1, "weight_decay": 0.01, "seed": SEED, "save_every": 200, "keep_checkpoints": 1},
}


def train_tokenizer(docs: list[str], out: Path) -> None:
    """A byte-level BPE with BOS/EOS, trained on the corpus itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            clean_up_tokenization_spaces=False).save_pretrained(out)


def init_model(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **ARCH)
    LlamaForCausalLM(cfg).save_pretrained(out)


def build(work: Path, steps: int) -> Path:
    from tunelab.config import validate_config
    from tunelab.train.loop import train

    work.mkdir(parents=True, exist_ok=True)
    docs = corpus(build_world(SEED), CORPUS_SEED)
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    init = work / "init"
    init.mkdir(exist_ok=True)
    train_tokenizer(docs, init)
    init_model(init)
    tree = json.loads(json.dumps(PRETRAIN))
    tree["model"] = {"path": str(init)}
    tree["data"]["train"] = str(work / "corpus.jsonl")
    tree["train"]["max_steps"] = steps
    tree["output_dir"] = str(work / "pretrain")
    tree["overwrite"] = True
    result = train(validate_config(tree))
    return result.final_dir


def install(final: Path, steps: int, dest: Path = MODEL_DIR) -> None:
    """Copy the pre-trained model into the package, weights in bfloat16 (half the size)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dest.exists():
        shutil.rmtree(dest)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(final).save_pretrained(dest)
    (dest / "RECIPE.json").write_text(json.dumps({"built_by": "python -m tunelab.demo_world.build", "arch": ARCH,
                                                  "vocab": VOCAB, "pretrain": PRETRAIN, "steps": steps, "world_seed": SEED,
                                                  "corpus_seed": CORPUS_SEED}, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/demo-build")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    install(build(Path(args.work), args.steps), args.steps)
    print(f"installed the demo model in {MODEL_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
