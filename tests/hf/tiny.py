"""Tiny Hugging Face models built from a config (no download) and saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256  # the byte-level text sources' token ids

COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
          "vocab_size": VOCAB, "max_position_embeddings": 64}


def tiny_config(kind: str):
    import transformers as tf
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                             eos_token_id=0,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, architectures=["GPT2LMHeadModel"])
    if kind == "llama":
        return tf.LlamaConfig(**COMMON, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    if kind == "qwen2":
        return tf.Qwen2Config(**COMMON, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"])
    if kind == "mistral":
        return tf.MistralConfig(**COMMON, num_key_value_heads=2, architectures=["MistralForCausalLM"])
    if kind == "bert":
        return tf.BertConfig(**COMMON, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             architectures=["BertForMaskedLM"])
    if kind == "vit":
        return tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            image_size=16, patch_size=8, num_labels=4, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, architectures=["ViTForImageClassification"])
    raise ValueError(kind)


def save_tiny(kind: str, folder: Path, *, weights: bool = False, seed: int = 0) -> Path:
    """A folder with config.json (and model.safetensors when `weights`)."""
    import transformers as tf
    config = tiny_config(kind)
    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(seed)
        getattr(tf, config.architectures[0])(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder
