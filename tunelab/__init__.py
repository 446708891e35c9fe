"""tunelab: fine-tune a pretrained causal LM on labeled examples, and measure what it bought and cost."""

import warnings

__version__ = "0.1.0"

# peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` alias on every wrap, which printed a
# FutureWarning in every command; it is peft's to change, not the user's (transformers says: removed in v6).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# bitsandbytes (imported by peft) would ask the Hugging Face Hub for a CPU kernel at import: tunelab never fetches one
from tunelab.models.quantize import install_quiet_import  # noqa: E402  (light: the standard library only)

install_quiet_import()
