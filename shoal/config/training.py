"""The sections of one training run: [model], [data], [train], [parallel], [checkpoint], [launch],
[log], [sync] and [fault].

Each is a keyword-only dataclass whose fields are declared with `option(...)` (fields.py). Beside
them, the values other modules read with these sections: which sync.method values are comm hooks
and which are outer syncs, and `rank_seed` (train.seed made distinct per rank and site).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.config.fields import option


COMPRESSION_HOOKS = ("fp16", "bf16", "int8", "int4", "powersgd")
"""sync.method values that compress DDP's gradient all-reduce with a comm hook (shoal/sync/compress.py)."""
OUTER_SYNC_METHODS = ("local_sgd", "diloco")
"""sync.method values that average parameters every sync.inner_steps steps instead of gradients."""


def rank_seed(seed: int, rank: int, site: int = 0) -> int:
    """A seed of its own for each rank (dropout, chaos draws): train.seed plus prime multiples of the
    rank and of its site's index, distinct for every (site, rank) with fewer than 104,729 ranks a
    site, whatever the sites' sizes (site * world_size + rank repeats across sites of different sizes)."""
    return seed + 7919 * rank + 104729 * site


@dataclass(kw_only=True)
class ModelConfig:
    name: str = option("gpt", "Reference model to train; ignored when `factory` or `hf` is set.",
                       choices=("gpt", "mlp", "dlrm", "cnn"))
    flavour: str = option("debug", "Size preset of the reference model (see shoal/models).",
                          choices=("debug", "small", "medium", "125m"))
    factory: str = option("", "Your own model as 'package.module:function'; called with the DataSpec, "
                              "returns an nn.Module. Empty means use `name`.")
    hf: str = option("", "A Hugging Face model folder (config.json, optional model.safetensors); the class "
                         "comes from the config's `architectures`. Empty means use `factory` or `name`.")
    loss: str = option("", "Loss: empty means the built-in (cross-entropy for integer targets, MSE for "
                           "floats); 'model' means the model's own output.loss; 'package.module:function' "
                           "is called as fn(output, batch) -> scalar.")
    n_layers: int = option(0, "Transformer blocks or MLP hidden layers. 0 means the flavour's value.", min=0)
    dim: int = option(0, "Hidden width. 0 means the flavour's value.", min=0)
    n_heads: int = option(0, "Attention heads (gpt). 0 means the flavour's value.", min=0)
    dropout: float = option(0.0, "Dropout probability inside the model. 0 disables it.", min=0.0, max=0.9)


@dataclass(kw_only=True)
class DataConfig:
    source: str = option("stdlib", "Where samples come from: 'stdlib' (character corpus of Python's own "
                                   "sources, offline), 'text' (your text files), 'npy' (your x/y arrays), "
                                   "'synthetic' (generated classification with a known rule), 'clicks' "
                                   "(generated click log for dlrm), 'shards' (token shards made by `shoal data "
                                   "prepare`), 'arrow'/'parquet' (tables, memory-mapped), 'images' (class "
                                   "folders or a CSV/Parquet of path,label). Ignored when `factory` is set. "
                                   "See docs/data.md.",
                         choices=("stdlib", "text", "npy", "synthetic", "clicks", "shards", "arrow", "parquet",
                                  "images"))
    path: str = option("", "For 'text': a file or folder of .txt files. For 'npy': a folder with x.npy "
                           "and y.npy, or 'X.npy,Y.npy'. For 'shards': the folder `shoal data prepare` wrote. "
                           "For 'arrow'/'parquet': a file, a folder of them, or a `datasets.save_to_disk` "
                           "folder. For 'images': a folder of class folders, or a .csv/.parquet of "
                           "path,label. Unused otherwise.")
    seq_len: int = option(128, "Tokens per training sequence (token sources).", min=2, max=65536)
    max_bytes: int = option(4_000_000, "Cap on the stdlib corpus size in bytes, to keep the cache small.",
                            min=10_000)
    num_samples: int = option(8192, "Samples generated for 'synthetic' and 'clicks'.", min=16)
    features: int = option(32, "Input features for 'synthetic'.", min=1)
    classes: int = option(4, "Classes for 'synthetic'.", min=2)
    val_fraction: float = option(0.05, "Share of samples held out for evaluation.", min=0.0, max=0.5)
    cache_dir: str = option("", "Where the tokenised corpus is cached. Empty means ~/.cache/shoal.")
    factory: str = option("", "Your own data as 'package.module:function': returns a map-style torch Dataset "
                              "(or a (train, validation) pair) of (input, target) tuples or dicts of tensors. "
                              "Empty means use `source`.")
    collate: str = option("", "With `factory`: 'package.module:function' that turns a list of items into a "
                              "batch. Empty means torch's default_collate.")
    tokenizer: str = option("bytes", "How text becomes token ids ('text' columns of arrow/parquet): 'bytes' (256 "
                                     "ids), 'bpe' (the bundled 2048-token BPE), or a local tokenizer.json or "
                                     "transformers tokenizer folder.")
    columns: str = option("", "For 'arrow'/'parquet': the token-id column, the text column, or comma-separated "
                              "feature columns (with `label`). Empty means the first of input_ids, tokens, text.")
    label: str = option("", "For 'arrow'/'parquet': the label column of a feature table; for 'images' with a "
                            "CSV/Parquet: the label column (default 'label'). Empty means token data.")
    image_size: int = option(32, "For 'images': height and width of the square crop fed to the model.",
                             min=8, max=4096)
    augment: bool = option(True, "For 'images': random crop and horizontal flip on training images, seeded "
                                 "per sample. false means resize and centre crop only.")
    loader_workers: int = option(0, "Processes that read and decode batches ahead of the training step. "
                                    "0 means read in the training process. Each takes a core out of the "
                                    "worker's torch threads (launch.threads = 0).", min=0, max=64)
    prefetch: int = option(2, "Batches each loader worker reads ahead (with loader_workers > 0).", min=1)
    on_bad_record: str = option("error", "A corrupt image or unreadable record met in training: 'error' stops "
                                         "naming it; 'skip' drops it from its batch and counts it.",
                                choices=("error", "skip"))


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = option(200, "Optimizer steps to train.", min=1)
    batch_size: int = option(32, "Global batch: samples per optimizer step over all data-parallel ranks.",
                             min=1)
    grad_accum: int = option(1, "Micro-batches per rank per step (gradient accumulation). 1 means none.",
                             min=1)
    optimizer: str = option("adamw", "Optimizer.", choices=("adamw", "sgd"))
    lr: float = option(3e-3, "Peak learning rate.", min=0.0)
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of `lr` (cosine decay).",
                                 min=0.0, max=1.0)
    warmup_steps: int = option(20, "Linear warmup steps. 0 disables warmup.", min=0)
    weight_decay: float = option(0.1, "Decoupled weight decay (AdamW) or L2 (SGD).", min=0.0)
    momentum: float = option(0.0, "SGD momentum. 0 means plain SGD.", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this. 0 disables clipping.", min=0.0)
    precision: str = option("fp32", "Compute precision: 'bf16' runs forward under bf16 autocast.",
                            choices=("fp32", "bf16"))
    seed: int = option(1234, "Seed for weights, data order and dropout.")
    eval_every: int = option(50, "Evaluate on held-out data every N steps. 0 disables evaluation.", min=0)
    eval_batches: int = option(4, "Batches per evaluation.", min=1)


@dataclass(kw_only=True)
class ParallelConfig:
    dp_replicate: int = option(-1, "Data-parallel replicas (DDP, or HSDP with dp_shard>1). "
                                   "-1 means all ranks the other degrees leave.", min=-1)
    dp_shard: int = option(1, "Fully sharded (FSDP) degree. 1 means disabled; -1 fills the world.", min=-1)
    tp: int = option(1, "Tensor parallel degree. 1 means disabled.", min=1)
    pp: int = option(1, "Pipeline parallel degree. 1 means disabled.", min=1)
    auto: bool = option(False, "Take the layout `shoal plan` recommends for the world being started (fastest "
                               "predicted that fits, from this host's cached calibration); it replaces "
                               "dp_replicate, dp_shard, tp and pp, and the log says why. false keeps them.")
    pp_schedule: str = option("1f1b", "Pipeline schedule.", choices=("gpipe", "1f1b", "interleaved_1f1b"))
    pp_microbatches: int = option(4, "Micro-batches per pipeline step.", min=1)
    activation_checkpointing: str = option("none", "Recompute activations in backward to save memory.",
                                           choices=("none", "full", "selective"))
    compile: bool = option(False, "Compile each block with torch.compile.")
    cpu_offload: bool = option(False, "Keep FSDP-sharded parameters and optimizer state in CPU memory.")
    shard_modules: list = option([], "Class names of the blocks FSDP shards one at a time (and AC/compile "
                                     "wrap), e.g. [\"LlamaDecoderLayer\"]. Empty means found automatically.")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = option(0, "Save every N steps. 0 means only at the end.", min=0)
    keep: int = option(3, "Checkpoints kept; older ones are deleted. 0 keeps all.", min=0)
    async_save: bool = option(False, "Write checkpoints in the background while training goes on.")
    dir: str = option("", "Checkpoint folder. Empty means <run dir>/checkpoints.")


@dataclass(kw_only=True)
class LaunchConfig:
    nproc: int = option(2, "Worker processes on this host.", min=1, max=512)
    device: str = option("auto", "Where workers compute: 'auto' picks cuda when present.",
                         choices=("auto", "cpu", "cuda"))
    backend: str = option("auto", "c10d backend: 'auto' is nccl on cuda and gloo on cpu.",
                          choices=("auto", "gloo", "nccl"))
    threads: int = option(0, "Torch threads per worker. 0 means cores / nproc.", min=0)
    rdzv_timeout: int = option(60, "Seconds to wait for the other hosts at rendezvous.", min=1)
    max_restarts: int = option(0, "Times the launcher restarts the workers after a failure.", min=0)


@dataclass(kw_only=True)
class LogConfig:
    name: str = option("", "Run name: the run directory is <dir>/<name>. Empty means the config file's name.")
    dir: str = option("runs", "Folder that holds run directories.")
    every: int = option(10, "Print a progress line (plain mode) and write TensorBoard scalars every N steps; "
                            "metrics.jsonl gets every step.", min=1)
    tensorboard: bool = option(True, "Also write TensorBoard event files.")
    progress: str = option("auto", "Progress display on rank 0: a live bar on a terminal, plain lines otherwise.",
                           choices=("auto", "bar", "plain", "off"))
    mlflow: bool = option(False, "Also log metrics, events and the config to MLflow (pip install 'shoal[mlflow]').")
    mlflow_uri: str = option("", "MLflow tracking URI (http://server:5000, a database, file:/path). Empty means "
                                 "the local store <log.dir>/mlruns.")
    wandb: bool = option(False, "Also log metrics, events and the config to Weights & Biases (pip install "
                                "'shoal[wandb]').")
    wandb_mode: str = option("offline", "W&B mode: offline writes <run dir>/wandb/ and needs no network "
                                        "(`wandb sync` uploads it later); online logs in as wandb does.",
                             choices=("offline", "online"))
    wandb_project: str = option("shoal", "W&B project of the run.")


@dataclass(kw_only=True)
class SyncConfig:
    method: str = option("allreduce", "How data-parallel replicas agree: a gradient all-reduce every step "
                                      "(allreduce, or compressed: fp16, bf16, int8, int4, powersgd) or an outer "
                                      "sync every `inner_steps` steps (local_sgd, diloco). See docs/sync.md.",
                         choices=("allreduce", *COMPRESSION_HOOKS, *OUTER_SYNC_METHODS))
    inner_steps: int = option(30, "Local optimizer steps between outer syncs (local_sgd, diloco). "
                                  "1 means sync after every step.", min=1)
    outer_lr: float = option(0.0, "DiLoCo outer learning rate on the averaged pseudo-gradient. 0 means the "
                                  "value tuned for this replica count and inner_steps (docs/sync.md); 1 with "
                                  "outer_momentum 0 means plain parameter averaging.", min=0.0)
    outer_momentum: float = option(-1.0, "DiLoCo outer SGD momentum, below 1. -1 means the value tuned for "
                                         "this replica count and inner_steps (docs/sync.md); 0 means none.",
                                   min=-1.0, max=1.0)
    outer_warmup: int = option(-1, "DiLoCo outer steps over which the outer lr ramps up linearly. -1 means the "
                                   "value tuned for this replica count and inner_steps; 0 means none.", min=-1)
    nesterov: bool = option(True, "Use Nesterov momentum in the DiLoCo outer step (ignored when "
                                  "outer_momentum is 0).")
    compression: str = option("auto", "Wire format of DiLoCo pseudo-gradients. 'auto' means int8 for diloco; "
                                      "'none' sends fp32; 'fp4' 4-bit floats (Streaming DiLoCo); 'topk' the "
                                      "largest topk_fraction of values in topk_bits bits with error feedback "
                                      "(SparseLoCo).",
                              choices=("auto", "none", "fp16", "bf16", "int8", "int4", "fp4", "topk"))
    topk_fraction: float = option(0.02, "compression = 'topk': share of each 4096-value chunk sent, in (0, 1]. "
                                        "1 sends every value.", min=0.0, max=1.0)
    topk_bits: int = option(2, "compression = 'topk': bits per value sent.", choices=(2, 4, 8))
    fragments: int = option(1, "Streaming DiLoCo: parameter fragments synced in turn, staggered over "
                               "inner_steps. 1 means sync the whole model at once.", min=1)
    overlap: bool = option(False, "Streaming DiLoCo: let a fragment's all-reduce run behind the next "
                                  "inner step (applied one step late). false means wait for it.")
    powersgd_rank: int = option(4, "PowerSGD low-rank approximation rank. 1 is the most compression.", min=1)
    powersgd_warmup: int = option(10, "Steps of plain all-reduce before PowerSGD starts; at least 2, "
                                      "because DDP rebuilds its buckets after step 1.", min=2)
    error_feedback: bool = option(True, "Carry each step's quantisation error into the next (int8, int4, "
                                        "powersgd). false drops it.")


@dataclass(kw_only=True)
class FaultConfig:
    enabled: bool = option(False, "Per-step fault tolerance: survivors of a failure continue without a restart "
                                  "and replacements receive state from a live peer. false means a failure stops "
                                  "(or restarts, launch.max_restarts) every worker. See docs/fault.md.")
    min_workers: int = option(1, "Training continues while at least this many workers are alive.", min=1)
    max_workers: int = option(0, "Most workers training at once (joiners wait beyond it). 0 means launch.nproc "
                                 "(times --nnodes under shoal launch).", min=0)
    step_timeout: float = option(30.0, "Seconds a step's gradient exchange may take before the missing workers "
                                       "are dropped as hung.", min=0.5)
    join_timeout: float = option(120.0, "Seconds a worker waits to be admitted to the group before it gives up.",
                                 min=1.0)
    max_restarts: int = option(3, "Without per-step recovery (a layout with no replica to drop): times every "
                                  "worker is restarted from the last checkpoint. 0 means never.", min=0)
    restarts_per_hour: int = option(0, "Per-step recovery: replacements of one worker slot within any hour, for "
                                       "workers that died after committing steps. 0 means no limit.", min=0)
    crash_loop: int = option(5, "Per-step recovery: a slot whose worker crashes (exits with an error) this many "
                                "times in a row before committing a step stops the job; restarts between them "
                                "back off 1 s, 2 s, 4 s, ...", min=1)
    grace_seconds: float = option(25.0, "After SIGTERM/SIGINT/SIGUSR1 (preemption), seconds the workers get to stop "
                                        "at the next step and save a checkpoint before they are killed "
                                        "(Kubernetes gives 30).", min=1.0)
