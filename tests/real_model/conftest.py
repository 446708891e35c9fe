"""The real-model tier: SmolLM2-135M-Instruct (../shared/data/smollm2_135m_instruct, one GGUF file) as a float32
Hugging Face folder, converted once per test session with transformers' GGUF loader.

Stand-in on the qlora branch for the gguf branch's fixture of the same name (there made by `tunelab convert gguf`
and cached between sessions): at merge, that branch's conftest replaces this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import shared_file

SMOLLM2_GGUF = "smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32, dequantized from its Q4_1 GGUF by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = shared_file(SMOLLM2_GGUF)
    out = tmp_path_factory.mktemp("smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF file's own quantization is undone: the folder is a plain float32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out
