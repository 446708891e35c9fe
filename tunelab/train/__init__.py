"""The training loop and its parts: loss, optimizer and schedule, checkpoints, metric sinks."""
