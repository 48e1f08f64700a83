"""The minimal hand-written DDP loop that benchmarks/overhead.py compares `shoal run` with.

Same model (shoal's gpt 'debug'), same data windows, same AdamW and batch; nothing else:
no checkpoints, no metrics files, no progress display. Run under torchrun:

    torchrun --standalone --nproc-per-node 2 benchmarks/handwritten_ddp.py OUT.jsonl STEPS BATCH SEQ_LEN [HF_FOLDER]

With HF_FOLDER (a saved `transformers` model's folder) the model is that one, unchanged,
and the loss is read from its output's `.logits`.
"""

import json
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from shoal.data.datasets import TokenWindows, cache_dir, stdlib_corpus
from shoal.models.gpt import build_gpt
from shoal.runtime.env import end_distributed  # (importing it comes before any init_process_group)


def main() -> None:
    out, steps, batch, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = TokenWindows(stdlib_corpus(4_000_000, cache_dir()), seq_len)
    torch.manual_seed(0)
    hf = sys.argv[5] if len(sys.argv) > 5 else ""
    if hf:
        import transformers
        config = transformers.AutoConfig.from_pretrained(hf)
        net = getattr(transformers, config.architectures[0])._from_config(config)
        net.config.use_cache = False
    else:
        net = build_gpt(256, seq_len, "debug")
    model = DistributedDataParallel(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    log = open(out, "w") if rank == 0 else None
    for step in range(1, steps + 1):
        ids = torch.randint(0, len(data), (batch,), generator=g)[rank::world]
        x, y = data.get(ids)
        out = model(x)
        loss = F.cross_entropy((out.logits if hf else out).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss.detach())  # the same per-step loss reduction shoal does for logging
        if log:
            log.write(json.dumps({"step": step, "time": time.time()}) + "\n")
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    peaks = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if log:
        log.write(json.dumps({"peak_rss_mb": [float(p) for p in peaks]}) + "\n")
        log.close()
    end_distributed(model)


if __name__ == "__main__":
    main()
