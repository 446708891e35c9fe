"""The one device decision: what `auto` picks, bf16 only where asked or supported, and a clear error for a GPU
that is not there (train and eval alike)."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import VARIED_ROWS, config_tree, write_jsonl
from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.evaluate.loaders import load_for_eval
from tunelab.models.device import choose_device, to_device


def test_auto_picks_cuda_only_when_there_is_one():
    choice = choose_device("auto")
    assert choice.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu").autocast_dtype is None  # fp32 on the CPU unless bf16 is asked for
    assert choose_device("cpu", "bf16").autocast_dtype == torch.bfloat16
    with choose_device("cpu", "bf16").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    batch = to_device({"input_ids": torch.ones(1, 3, dtype=torch.long)}, choose_device("cpu").device)
    assert batch["input_ids"].device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_a_missing_gpu_is_a_clear_error_for_train_and_eval(tmp_path, stories260k, capsys):
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_for_eval(str(stories260k), device="cuda")
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       train={"device": "cuda"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.device is 'cuda' but no CUDA device is available" in err and "Traceback" not in err


def test_eval_loads_onto_the_chosen_device(stories260k):
    em = load_for_eval(str(stories260k))  # auto
    assert {p.device.type for p in em.model.parameters()} == {choose_device("auto").device.type}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("command", ["eval", "diff", "chat", "generate"])
def test_every_model_command_takes_device_and_refuses_a_missing_gpu(command, stories260k, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    argv = {"eval": ["eval", str(stories260k), str(data)], "diff": ["diff", str(stories260k), str(stories260k)],
            "chat": ["chat", str(stories260k)], "generate": ["generate", str(stories260k), "--prompt", "hi"]}[command]
    assert main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "eval.device is 'cuda' but no CUDA device is available" in err and "Traceback" not in err


def test_bf16_eval_loads_bf16_weights_and_scores_like_fp32(stories260k):
    """precision bf16 halves the weights' memory; the log-probabilities stay float32 sums of bf16 logits, close to
    the fp32 model's."""
    from tunelab.data.encode import encode_examples
    from tunelab.data.render import Rendered
    from tunelab.evaluate.score import sequence_log_probs
    from tunelab.models.load import pad_token_id

    fp32 = load_for_eval(str(stories260k), device="cpu", precision="fp32")
    bf16 = load_for_eval(str(stories260k), device="cpu", precision="bf16")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    texts = [r["prompt"][:40] + r["completion"] for r in VARIED_ROWS[:6]]
    encoded = encode_examples([Rendered(t, [(40, len(t))], "d.jsonl", i) for i, t in enumerate(texts)],
                              fp32.tokenizer, 64)
    pad = pad_token_id(fp32.tokenizer)
    want = torch.tensor([s for s, _ in sequence_log_probs(fp32.model, encoded, pad)])
    got = torch.tensor([s for s, _ in sequence_log_probs(bf16.model, encoded, pad)])
    assert not torch.equal(got, want)  # really computed in bf16
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.5)


def test_a_runs_eval_section_chooses_the_precision_and_a_flag_overrides_it(tmp_path, stories260k, capsys):
    import json

    from tunelab.config import validate_config
    from tunelab.train.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS)
    train(validate_config(config_tree(stories260k, data, tmp_path / "run", eval={"device": "cpu",
                                                                                  "precision": "bf16"})))
    assert {p.dtype for p in load_for_eval(str(tmp_path / "run")).model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_for_eval(str(tmp_path / "run"), precision="fp32").model.parameters()} == \
        {torch.float32}
    out = tmp_path / "e.json"
    assert main(["eval", str(tmp_path / "run"), str(data), "--output", str(out), "--max-examples", "3"]) == 0
    assert json.loads(out.read_text())["settings"]["precision"] == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_liger_loss_kernel_is_refused_off_cuda_before_anything_is_written(tmp_path, stories260k, capsys):
    tree = config_tree(stories260k, write_jsonl(tmp_path / "d.jsonl", VARIED_ROWS), tmp_path / "run",
                       train={"device": "cpu", "loss_kernel": "liger"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.loss_kernel is 'liger'" in err and "CUDA only" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
