"""Train a Hugging Face Llama on your own torch Dataset from Python, on 2 local workers.

    python examples/python_api/train.py
    python examples/python_api/train.py --ray    # on 2 Ray Train workers (a local Ray)
"""

import sys

import torch
import transformers
from torch.utils.data import Dataset

import shoal

TEXT = open(transformers.__file__, "rb").read()  # any bytes will do: here, a source file on disk


class Bytes(Dataset):
    """Windows of 33 bytes: the first 32 are the input, the last 32 the next-token targets."""

    vocab_size = 256  # token ids run 0..255 (Shoal checks the model's vocabulary against it)

    def __len__(self):
        return len(TEXT) // 33

    def __getitem__(self, i):
        window = torch.tensor(list(TEXT[i * 33:(i + 1) * 33]))
        return window[:-1], window[1:]


def build_model(spec):  # a PreTrainedModel, unchanged; `spec` describes the data
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


if __name__ == "__main__":  # the workers import this file to find Bytes and build_model
    config = shoal.Config()
    config.train.steps, config.train.batch_size, config.parallel.dp_shard = 20, 8, 2  # FSDP over 2 workers
    result = shoal.train(config, model=build_model, data=Bytes, ray="--ray" in sys.argv[1:])
    print(result.run_dir, result.metrics["loss"])
