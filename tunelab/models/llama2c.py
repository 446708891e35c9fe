"""Convert a llama2.c checkpoint (legacy `.bin`) and its tokenizer into a Hugging Face Llama folder.

llama2.c stores float32 weights after a 7-int header and rotates adjacent pairs in RoPE; Hugging
Face Llama rotates halves, so wq and wk are permuted per head. The tokenizer is a SentencePiece-style
BPE (merge the adjacent pair whose result has the best score, byte fallback for unknown characters,
a dummy-prefix space), rebuilt here as a `tokenizers` BPE so that `AutoTokenizer` encodes and
decodes it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import ModelError

SPACE = "\u2581"  # SentencePiece's visible space
_HEADER = struct.Struct("<7i")


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative in the file when the output head is not shared
    seq_len: int

    @property
    def shared_classifier(self) -> bool:
        return self.vocab_size > 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ModelError(f"{what} '{path}' does not exist. Pass the path of an existing llama2.c file.")
    return path.read_bytes()


def read_checkpoint(path: Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a legacy llama2.c checkpoint into its header and Hugging Face Llama weights."""
    raw = _read_file(path, "llama2.c checkpoint")
    if len(raw) < _HEADER.size:
        raise ModelError(f"'{path}' is {len(raw)} bytes, too short for a llama2.c header (28 bytes).")
    h = Llama2cHeader(*_HEADER.unpack_from(raw, 0))
    if min(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.seq_len) <= 0 or h.dim % h.n_heads:
        raise ModelError(f"'{path}' does not start with a valid llama2.c header: {h}.")
    vocab, dim, hid, L = abs(h.vocab_size), h.dim, h.hidden_dim, h.n_layers
    kv_dim = h.n_kv_heads * h.head_dim
    floats = torch.frombuffer(bytearray(raw[_HEADER.size :]), dtype=torch.float32)
    shapes = [
        ("embed", (vocab, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hid, dim)),
        ("w2", (L, dim, hid)), ("w3", (L, hid, dim)), ("rms_final", (dim,)),
        ("freq_cis", (h.seq_len * h.head_dim,)),  # two legacy RoPE tables, skipped
    ]
    need = sum(torch.Size(s).numel() for _, s in shapes) + (0 if h.shared_classifier else vocab * dim)
    if floats.numel() < need:
        raise ModelError(f"'{path}' holds {floats.numel()} floats but its header {h} needs {need}: the file is truncated.")
    parts: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        n = torch.Size(shape).numel()
        parts[name] = floats[offset : offset + n].reshape(shape).clone()
        offset += n
    if not h.shared_classifier:
        parts["classifier"] = floats[offset : offset + vocab * dim].reshape(vocab, dim).clone()
    return h, _to_hf_state_dict(h, parts)


def _permute_rope(w: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """Turn llama2.c's interleaved RoPE pairs into Hugging Face's rotate-half layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, dim).transpose(1, 2).reshape(-1, dim)


def _to_hf_state_dict(h: Llama2cHeader, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["rms_final"]}
    for i in range(h.n_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = p["rms_att"][i]
        sd[pre + "post_attention_layernorm.weight"] = p["rms_ffn"][i]
        sd[pre + "self_attn.q_proj.weight"] = _permute_rope(p["wq"][i], h.n_heads, h.dim)
        sd[pre + "self_attn.k_proj.weight"] = _permute_rope(p["wk"][i], h.n_kv_heads, h.dim)
        sd[pre + "self_attn.v_proj.weight"] = p["wv"][i]
        sd[pre + "self_attn.o_proj.weight"] = p["wo"][i]
        sd[pre + "mlp.gate_proj.weight"] = p["w1"][i]
        sd[pre + "mlp.down_proj.weight"] = p["w2"][i]
        sd[pre + "mlp.up_proj.weight"] = p["w3"][i]
    if "classifier" in p:
        sd["lm_head.weight"] = p["classifier"]
    return {k: v.contiguous() for k, v in sd.items()}


def read_tokenizer_pieces(path: Path, vocab_size: int) -> list[tuple[str, float]]:
    """Read `tokenizer.bin` into (piece, score) pairs, id order, with spaces as SentencePiece's '▁'."""
    raw = _read_file(path, "llama2.c tokenizer")
    offset = 4  # int32 max_token_length
    pieces = []
    for i in range(vocab_size):
        if offset + 8 > len(raw):
            raise ModelError(f"'{path}' ends after {i} tokens but the checkpoint has a vocabulary of {vocab_size}.")
        score, length = struct.unpack_from("<fi", raw, offset)
        text = raw[offset + 8 : offset + 8 + length].decode("utf-8", errors="strict")
        offset += 8 + length
        pieces.append((text.strip("\n") if i in (1, 2) else text.replace(" ", SPACE), score))
    return pieces


def build_tokenizer(pieces: list[tuple[str, float]]):
    """A `tokenizers` BPE equivalent to llama2.c's encoder: merges ranked by the score of their result."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    is_byte = {i for i, (p, _) in enumerate(pieces) if p.startswith("<0x") and p.endswith(">") and len(p) == 6}
    mergeable = {p: s for i, (p, s) in enumerate(pieces) if i not in specials and i not in is_byte}
    merges = []
    for piece, score in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((score, vocab[piece], left, right))
    merges.sort(key=lambda m: (-m[0], m[1]))
    model = BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], unk_token="<unk>",
                byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.add_special_tokens(list(specials.values()))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def convert_llama2c(model_path: Path, tokenizer_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face Llama folder (config, safetensors, tokenizer) for a llama2.c model."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    header, state_dict = read_checkpoint(Path(model_path))
    pieces = read_tokenizer_pieces(Path(tokenizer_path), abs(header.vocab_size))
    config = LlamaConfig(
        vocab_size=abs(header.vocab_size), hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=header.shared_classifier, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if header.shared_classifier:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    assert not missing, f"weights not filled from the checkpoint: {missing}"
    model.generation_config.do_sample = False
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(pieces), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=header.seq_len, clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out)
    (out / "tunelab_source.json").write_text(json.dumps(
        {"converted_from": "llama2.c", "model": str(model_path), "tokenizer": str(tokenizer_path)}, indent=2))
    return out
