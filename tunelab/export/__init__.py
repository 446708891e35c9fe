"""Export a finished run to where models run: merged Hugging Face checkpoints, GGUF files for llama.cpp, Ollama
(a Modelfile beside the GGUF) and LM Studio, and vLLM-ready LoRA adapters, each checked (parity.py runs the GGUF
in llama.cpp's own runtime against the tuned model)."""
