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
    # layers that differ: a sliding window (4) shorter than the tests' sequences (16) on some layers only
    if kind == "gemma2":
        return tf.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4,
                               architectures=["Gemma2ForCausalLM"])
    if kind == "gemma3":
        return tf.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"],
                                   architectures=["Gemma3ForCausalLM"])
    if kind == "qwen3":
        return tf.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                              sliding_window=4, max_window_layers=1, architectures=["Qwen3ForCausalLM"])
    if kind == "phi3":
        return tf.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                              architectures=["Phi3ForCausalLM"])
    if kind == "olmo2":
        return tf.Olmo2Config(**COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                               architectures=["Olmo2ForCausalLM"])
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(**COMMON, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                                architectures=["GPTNeoXForCausalLM"])
    if kind == "deepseek_v2":  # dense layers only; its plan splits the latent attention 'mla_kv_a_proj'
        return tf.DeepseekV2Config(**COMMON, num_key_value_heads=4, first_k_dense_replace=2, kv_lora_rank=16,
                                   q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                   bos_token_id=0, eos_token_id=0, architectures=["DeepseekV2ForCausalLM"])
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
