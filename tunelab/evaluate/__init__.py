"""Evaluation: generation, scoring of label options, task metrics, and the base-vs-tuned diff."""
