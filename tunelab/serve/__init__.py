"""`tunelab serve`: an OpenAI-compatible HTTP server and chat page over a model, its tuned runs and their adapters."""
