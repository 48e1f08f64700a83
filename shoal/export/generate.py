"""Sampling text from a trained language model: Shoal's gpt or a Hugging Face causal LM.

The gpt model is sampled token by token here (temperature, then top-k, as in nanoGPT's
`generate`), its context cropped to the `seq_len` it was trained on; a Hugging Face model
uses its own `generate`; for an encoder-decoder model (T5, BART) the text printed is the
decoder's output for the prompt (trained on token data, the prompt's next tokens), not the
prompt and its continuation. Text becomes token ids through the run's tokenizer when its
`[data]` section names one, and through bytes (ids 0-255, the stdlib and text sources'
encoding) otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from shoal.config import ConfigError
from shoal.data.tokenizer import Tokenizer, load_tokenizer
from shoal.export.consolidate import LoadedModel, is_hf_model


def codec_for(loaded: LoadedModel) -> Tokenizer:
    """The tokenizer the run trained with: the shard set's (recorded in its index.json) for
    `data.source = "shards"`, else `data.tokenizer` (bytes unless it names another)."""
    data = loaded.cfg.data
    name = getattr(data, "tokenizer", "") or "bytes"
    if data.source == "shards":
        index = Path(data.path) / "index.json"
        if index.is_file():
            name = json.loads(index.read_text())["tokenizer"]["name"]
    return load_tokenizer(name)


@torch.no_grad()
def sample_gpt(model: nn.Module, prompt: torch.Tensor, tokens: int, *, context: int, temperature: float = 0.8,
               top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """`prompt` (1-D ids) followed by `tokens` sampled ids; temperature 0 picks the likeliest."""
    ids = prompt.view(1, -1)
    for _ in range(tokens):
        logits = model(ids[:, -context:])[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0]


def generate(loaded: LoadedModel, prompt: str, tokens: int, *, temperature: float = 0.8, top_k: int = 0,
             seed: int = 0) -> str:
    """The prompt followed by `tokens` generated tokens, as text."""
    codec = codec_for(loaded)
    prompt_ids = codec.encode(prompt)
    if not prompt_ids:
        raise ConfigError("--prompt is empty: give at least one character to continue")
    vocab = loaded.spec.vocab_size or getattr(getattr(loaded.model, "config", None), "vocab_size", 0)
    if vocab and max(prompt_ids) >= vocab:
        raise ConfigError(f"--prompt has token id {max(prompt_ids)}, beyond the model's vocabulary of {vocab}")
    ids = torch.tensor(prompt_ids, dtype=torch.long)
    torch.manual_seed(seed)
    if is_hf_model(loaded.model):
        if not loaded.model.can_generate():
            raise ConfigError(f"generate needs a language model; this run's {type(loaded.model).__name__} gives no "
                              f"text (use shoal predict)")
        out = loaded.model.generate(ids.view(1, -1), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=tokens, min_new_tokens=tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None,
                                    top_k=top_k or None, pad_token_id=0)[0]
        if loaded.model.config.is_encoder_decoder:
            # the decoder's own sequence, without its start token: the answer to the prompt, not a continuation
            return codec.decode(out[1:].tolist())
    elif loaded.spec.kind == "tokens":
        out = sample_gpt(loaded.model, ids, tokens, context=loaded.spec.seq_len, temperature=temperature,
                         top_k=top_k, generator=torch.Generator().manual_seed(seed))
    else:
        raise ConfigError(f"generate needs a language model; this run's model takes '{loaded.spec.kind}' data "
                          f"(use shoal predict)")
    return codec.decode(out.tolist())
