"""Model and tokenizer loading: safe defaults and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from tunelab.config import ModelConfig
from tunelab.errors import ModelError
from tunelab.models.load import check_model_folder, load_model, load_tokenizer


def test_loads_a_local_folder(stories260k):
    model = load_model(ModelConfig(path=str(stories260k)))
    assert model.config.use_cache is False  # training never builds a KV cache
    assert load_tokenizer(ModelConfig(path=str(stories260k))).eos_token == "</s>"


def test_hub_id_is_passed_through_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_model_folder("some-org/some-model") is False
    with pytest.raises(ModelError, match="cannot load a causal LM from 'some-org/some-model'"):
        load_model(ModelConfig(path="some-org/some-model"))
    with pytest.raises(ModelError, match="does not exist"):
        check_model_folder("./some-org/some-model")


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_model_folder(str(tmp_path / "m"))


def test_tokenizer_without_eos_is_an_error(tmp_path, stories260k):
    folder = tmp_path / "no-eos"
    shutil.copytree(stories260k, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no EOS token"):
        load_tokenizer(ModelConfig(path=str(folder)))
