"""Loading causal LMs and tokenizers, and converting foreign checkpoints to Hugging Face folders."""
