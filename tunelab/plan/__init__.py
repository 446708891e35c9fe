"""Before anything runs: parameter, memory, FLOPs and time estimates, and the strategy advisor."""
