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
