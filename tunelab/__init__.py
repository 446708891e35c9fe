"""tunelab: fine-tune a pretrained causal LM on labeled examples, and measure what it bought and cost."""

__version__ = "0.1.0"
