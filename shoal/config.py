"""Shoal's configuration: nested keyword-only dataclasses, TOML, `key.sub=value` overrides.

Every field is declared with `option(...)`, which carries a one-line help text and the
allowed values or range; `validate` checks them all and raises `ConfigError` naming the
field. The same metadata renders `shoal config` and docs/config.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user's mistake in a config file, an override or a command-line flag."""


USER_ERROR = 2
"""Exit code of any Shoal process that stopped on a user's mistake (after one `shoal: error:` line)."""
COMPRESSION_HOOKS = ("fp16", "bf16", "int8", "int4", "powersgd")
"""sync.method values that compress DDP's gradient all-reduce with a comm hook (shoal/sync/compress.py)."""
OUTER_SYNC_METHODS = ("local_sgd", "diloco")
"""sync.method values that average parameters every sync.inner_steps steps instead of gradients."""


def rank_seed(seed: int, rank: int, site: int = 0) -> int:
    """A seed of its own for each rank (dropout, chaos draws): train.seed plus prime multiples of the
    rank and of its site's index, distinct for every (site, rank) with fewer than 104,729 ranks a
    site, whatever the sites' sizes (site * world_size + rank repeats across sites of different sizes)."""
    return seed + 7919 * rank + 104729 * site


def option(default: Any, help: str, *, choices: tuple | None = None,
           min: float | None = None, max: float | None = None) -> Any:
    """A config field with its one-line help, allowed values and range."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


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
class FederatedConfig:
    address: str = option("127.0.0.1:8443", "Where the federated server listens (host:port); clients use --server.")
    certs_dir: str = option("certs", "Folder made by `shoal fed certs`: ca.pem, server.pem/.key, <client>.pem/.key, crl.pem.")
    rounds: int = option(3, "Rounds of training (for fedbuff: server updates).", min=1)
    in_features: int = option(0, "Model input width: the columns of every site's x.npy. The server builds the model "
                                 "from it and refuses sites that differ. 0 means unset (`fed server` and `fed client` "
                                 "refuse to start; `fed simulate` takes it from its data).", min=0)
    num_classes: int = option(0, "Model output classes; a site whose labels go past it is refused. 0 means unset "
                                 "(as for in_features).", min=0)
    max_samples: int = option(100_000_000, "Largest sample count a site may declare when it joins; its per-round "
                                           "claims may not exceed what it declared.", min=1)
    max_update_norm: float = option(0.0, "Largest L2 norm of one client's update; larger ones are dropped. 0 means "
                                         "derived per round: 10 x the round's median update norm, and at most "
                                         "10 x max(1, norm of the global model).", min=0.0)
    handshake_timeout: float = option(5.0, "Seconds a connection may stay unauthenticated (TCP accept to the first "
                                           "call with a valid certificate, TLS handshake included); then it is "
                                           "closed.", min=0.1)
    max_pending_per_peer: int = option(8, "Unauthenticated connections one IP address may hold open at once; "
                                          "more are refused at accept.", min=1)
    max_pending: int = option(128, "Unauthenticated connections the server holds open at once, from all "
                                   "addresses; more are refused at accept.", min=1)
    max_connections: int = option(512, "Connections of any kind the server holds open at once. The server checks "
                                        "at start that it may open 3 file descriptors per connection + 256.", min=1)
    require_crl: bool = option(True, "The server refuses to start without certs_dir/crl.pem and refuses every "
                                     "connection while it cannot read it. false lets it start without one (every "
                                     "certificate the CA signed is accepted); a CRL once read is still required.")
    strategy: str = option("fedavg", "How client updates become the next global model.",
                           choices=("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
                                    "fedtrimmedavg", "krum", "multikrum", "fedbuff"))
    fraction: float = option(1.0, "Share of connected clients sampled for each round.", min=0.0, max=1.0)
    min_clients: int = option(2, "Clients that must be connected before a round starts.", min=1)
    round_timeout: float = option(60.0, "Seconds a round waits for replies; it then closes with those that answered.",
                                  min=0.1)
    join_timeout: float = option(300.0, "Seconds the server waits for `min_clients` to connect.", min=0.1)
    local_epochs: int = option(1, "Passes over its own data each client makes per round.", min=1)
    server_lr: float = option(1.0, "Server learning rate (fedadam/fedyogi/fedadagrad/fedbuff). 1 means plain mean.",
                              min=0.0)
    proximal_mu: float = option(0.01, "FedProx proximal weight mu. 0 makes FedProx equal FedAvg.", min=0.0)
    beta1: float = option(0.9, "FedAdam/FedYogi first-moment decay.", min=0.0, max=1.0)
    beta2: float = option(0.99, "FedAdam/FedYogi second-moment decay.", min=0.0, max=1.0)
    tau: float = option(1e-3, "FedAdam/FedYogi/FedAdagrad adaptivity (epsilon).", min=0.0)
    trim_fraction: float = option(0.2, "FedTrimmedAvg: share of values cut from each end per coordinate.",
                                  min=0.0, max=0.49)
    byzantine: int = option(1, "Krum/MultiKrum: number of malicious clients tolerated (f).", min=0)
    krum_keep: int = option(0, "MultiKrum: best-scored updates averaged. 0 means n - f.", min=0)
    buffer_size: int = option(3, "FedBuff: client updates buffered before each server update (K).", min=1)
    max_staleness: int = option(10, "FedBuff: updates older than this many server versions are dropped.", min=0)
    buffer_per_site: int = option(0, "FedBuff: most updates one site may place in one buffer (a site at its share "
                                     "gets no new task until the buffer is applied). 0 means a fair share: "
                                     "ceil(buffer_size / connected sites).", min=0)
    secagg: bool = option(False, "Secure aggregation: the server learns only the sum of the updates.")
    secagg_threshold: int = option(0, "Secure aggregation: clients needed to unmask. 0 means a majority.", min=0)
    dp: str = option("off", "Client-level central differential privacy: clip each update and add Gaussian noise.",
                     choices=("off", "fixed", "adaptive"))
    dp_noise: float = option(1.0, "DP noise multiplier z (noise std = z x clip norm).", min=0.0)
    dp_clip: float = option(1.0, "DP clip norm of each client update (initial value when adaptive).", min=0.0)
    dp_quantile: float = option(0.5, "Adaptive clipping: target share of updates left unclipped.", min=0.0, max=1.0)
    dp_clip_lr: float = option(0.2, "Adaptive clipping: geometric learning rate of the clip norm.", min=0.0)
    dp_delta: float = option(1e-5, "DP delta at which epsilon is reported.", min=0.0, max=1.0)
    local_dp: bool = option(False, "DP-SGD inside each client through opacus (per-sample clipping and noise).")
    local_dp_noise: float = option(1.0, "Local DP-SGD noise multiplier.", min=0.0)
    local_dp_clip: float = option(1.0, "Local DP-SGD per-sample gradient clip norm.", min=0.0)
    max_message_mb: int = option(512, "Upper bound on any gRPC message in MiB. The actual limit is the model's "
                                      "size plus 1 MiB; a model too large for this bound is refused at start.", min=1)
    sim_clients: int = option(100, "`fed simulate`: virtual clients (--clients overrides).", min=1)
    sim_workers: int = option(2, "`fed simulate`: worker processes; memory is set by this, not by the clients.",
                              min=1)
    sim_data: str = option("digits", "`fed simulate`: data split among clients: 'digits' (scikit-learn's bundled "
                                     "8x8 images), 'breast_cancer' (bundled tabular) or 'data' (the [data] section).",
                           choices=("digits", "breast_cancer", "data"))
    partition: str = option("iid", "`fed simulate`: how samples are dealt to clients.",
                            choices=("iid", "dirichlet", "shards"))
    dirichlet_alpha: float = option(0.5, "Dirichlet concentration: small alpha means strong label skew.", min=1e-3)
    shards_per_client: int = option(2, "Label shards per client for partition = 'shards'.", min=1)


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


@dataclass(kw_only=True)
class SitesConfig:
    name: str = option("", "This site's name, as in its certificate (`shoal sites certs`). Empty means no "
                           "sites: the run is one site. See docs/sites.md.")
    listen: str = option("", "host:port where this site's leader accepts the other sites' mutual-TLS "
                             "connections (the only port a site opens to them).")
    peers: list = option([], "The other sites as [\"name=host:port\", ...]: where their leaders listen.")
    certs: str = option("", "Folder with ca.pem, crl.pem and this site's <name>.pem/<name>.key.")
    internal: str = option("127.0.0.1", "The address this site's c10d store and Gloo use: loopback or the "
                                        "site's own network, never one the other sites can reach.")
    grace_seconds: float = option(10.0, "Seconds an outer sync waits for a missing site before it is dropped "
                                        "from the average; no site waits longer.", min=0.1)
    join_timeout: float = option(300.0, "Seconds a joining site waits for a running site's state before it "
                                        "trains alone.", min=1.0)


@dataclass(kw_only=True)
class SelfplayConfig:
    game: str = option("", "Self-play (AlphaZero): the game, a module of shoal/selfplay/games/ ('tictactoe', "
                           "'connect4'). Empty means no self-play: the workers train [model] on [data]. See "
                           "docs/selfplay.md.")
    actors: int = option(2, "Actor processes on this host that play games against themselves with the newest "
                            "weights; the learner is launch.nproc workers beside them.", min=1, max=512)
    games_per_batch: int = option(8, "Games an actor plays at once (their searches' leaves share one network "
                                     "batch) and writes as one file: a batch is ingested whole or not at all.",
                                  min=1)
    simulations: int = option(64, "MCTS simulations per self-play move.", min=1)
    c_puct: float = option(1.5, "PUCT exploration constant: larger trusts the network's prior over the "
                                "values found so far.", min=0.0)
    dirichlet_alpha: float = option(0.3, "Dirichlet noise concentration at the root of self-play searches "
                                         "(AlphaZero: about 10 / legal moves).", min=1e-3)
    dirichlet_fraction: float = option(0.25, "Share of the root prior replaced by Dirichlet noise. 0 means no "
                                             "noise.", min=0.0, max=1.0)
    temperature_moves: int = option(8, "Opening moves of a self-play game sampled in proportion to visit "
                                       "counts; later moves take the most visited. 0 means always the most "
                                       "visited.", min=0)
    replay_size: int = option(50_000, "Positions the learner's replay buffer holds; the oldest leave first.",
                              min=1)
    games_per_version: int = option(64, "New games the learner ingests before each weight version.", min=1)
    train_steps_per_version: int = option(40, "Optimizer steps per weight version.", min=1)
    batch_size: int = option(256, "Positions per optimizer step over all learner ranks.", min=1)
    augment: bool = option(True, "Train on a random one of the game's symmetric copies of each sampled "
                                 "position (the board's rotations and mirrors, as AlphaGo Zero did). false "
                                 "trains on the positions as played.")
    versions: int = option(100, "Weight versions to train; the run ends after the last one.", min=1)
    minutes: float = option(0.0, "Stop after the version in flight once this many minutes of training have "
                                 "passed (a checkpoint is saved). 0 means no time limit.", min=0.0)
    channels: int = option(64, "Width of the policy-value network's convolutions.", min=1)
    blocks: int = option(4, "Residual blocks of the policy-value network.", min=0)
    eval_every: int = option(5, "Evaluate every N weight versions (an evaluator process beside the actors). "
                                "0 disables evaluation.", min=0)
    eval_games: int = option(20, "Games per evaluation opponent, half with each colour.", min=2)
    eval_simulations: int = option(32, "Simulations of the network player's search in evaluation (no noise).",
                                   min=1)
    eval_mcts_simulations: list = option([200, 1000], "Plain MCTS opponents (random rollouts) by their "
                                                      "simulations per move, e.g. [200, 1000]. Empty means none.")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)
    selfplay: SelfplayConfig = field(default_factory=SelfplayConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _field_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


def _coerce(where: str, value: Any, kind: type) -> Any:
    """Check one value's type; strings from the command line are parsed first."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is list:  # a command-line list: comma-separated names
            return [item.strip() for item in text.strip("[]").replace('"', "").replace("'", "").split(",")
                    if item.strip()]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            else:
                value = kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got '{value}'") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from nested dicts (parsed TOML), checking keys and types."""
    cfg = base or Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]{_suggest(section, list(SECTIONS))}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value")
        target = getattr(cfg, section)
        types = _field_types(type(target))
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"unknown key {section}.{key}{_suggest(key, list(types))}")
            setattr(target, key, _coerce(f"{section}.{key}", value, types[key]))
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings, as typed on the command line."""
    for item in overrides:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        from_dict({section: {key: value}}, cfg)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults when path is None), apply overrides and validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: malformed TOML: {err}") from None
        from_dict(raw, cfg)
        if not cfg.log.name:
            cfg.log.name = path.stem if path.stem != "config" else path.parent.name
    apply_overrides(cfg, overrides or [])
    if not cfg.log.name:
        cfg.log.name = "shoal"
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every field's allowed values and range, then the rules that span fields."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value, meta = getattr(obj, f.name), f.metadata
            where = f"{section}.{f.name}"
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(str, meta['choices']))}"
                                  f"{_suggest(str(value), list(meta['choices'])) if isinstance(value, str) else ''}")
            if meta.get("min") is not None and value < meta["min"]:
                raise ConfigError(f"{where} = {value} is below its minimum {meta['min']}")
            if meta.get("max") is not None and value > meta["max"]:
                raise ConfigError(f"{where} = {value} is above its maximum {meta['max']}")
    if cfg.model.factory and ":" not in cfg.model.factory:
        raise ConfigError(f"model.factory = '{cfg.model.factory}' must look like 'package.module:function'")
    if cfg.model.loss and cfg.model.loss != "model" and ":" not in cfg.model.loss:
        raise ConfigError(f"model.loss = '{cfg.model.loss}' must be 'model' or look like 'package.module:function'")
    if cfg.model.hf and cfg.model.factory:
        raise ConfigError("model.hf and model.factory are both set; keep one")
    if any(not isinstance(name, str) for name in cfg.parallel.shard_modules):
        raise ConfigError(f"parallel.shard_modules = {cfg.parallel.shard_modules!r} must be a list of class names")
    for key in ("factory", "collate"):
        value = getattr(cfg.data, key)
        if value and ":" not in value:
            raise ConfigError(f"data.{key} = '{value}' must look like 'package.module:function'")
    if cfg.data.source in ("text", "npy", "shards", "arrow", "parquet", "images") and not cfg.data.path \
            and not cfg.data.factory:
        raise ConfigError(f"data.path is required when data.source = '{cfg.data.source}'")
    if cfg.data.source in ("text", "npy", "shards", "arrow", "parquet", "images") and not cfg.data.factory:
        for part in cfg.data.path.split(","):
            if not Path(part).exists():
                raise ConfigError(f"data.path: {part} does not exist")
    sync = cfg.sync
    outer = sync.method in OUTER_SYNC_METHODS
    if sync.method != "diloco" and (sync.compression not in ("auto", "none") or sync.fragments > 1
                                    or sync.overlap):
        raise ConfigError(f"sync.compression, sync.fragments and sync.overlap apply only to sync.method = "
                          f"'diloco', not '{sync.method}'")
    if sync.outer_momentum >= 1 or -1 < sync.outer_momentum < 0:
        raise ConfigError(f"sync.outer_momentum = {sync.outer_momentum} must be in [0, 1), or -1 for the tuned "
                          f"value: at 1 the outer momentum never decays and the outer step grows without bound")
    if not 0 < sync.topk_fraction <= 1:
        raise ConfigError(f"sync.topk_fraction = {sync.topk_fraction} must be in (0, 1]: the share of each "
                          f"chunk's values sent (0.02 sends 2 %)")
    if sync.compression != "topk" and (sync.topk_fraction != 0.02 or sync.topk_bits != 2):
        raise ConfigError(f"sync.topk_fraction and sync.topk_bits apply only to sync.compression = 'topk', "
                          f"not '{sync.compression}'")
    if sync.fragments > sync.inner_steps:
        raise ConfigError(f"sync.fragments = {sync.fragments} must be at most sync.inner_steps = "
                          f"{sync.inner_steps}: each fragment syncs once per outer round")
    if cfg.sites.name:
        validate_sites(cfg)
    elif outer and cfg.parallel.dp_replicate == 1:
        raise ConfigError(f"sync.method = '{sync.method}' averages over the parallel.dp_replicate axis, "
                          f"but parallel.dp_replicate = 1 leaves nothing to average over")
    if cfg.selfplay.game:
        validate_selfplay(cfg)
    if sync.method in COMPRESSION_HOOKS and cfg.parallel.dp_shard != 1:
        raise ConfigError(f"sync.method = '{sync.method}' is a DDP comm hook and needs parallel.dp_shard = 1 "
                          f"(FSDP has no comm hooks)")


def validate_selfplay(cfg: Config) -> None:
    """The [selfplay] rules that span fields (the game's name is checked against shoal/selfplay/games/ when a
    run starts, since this module imports nothing of the package)."""
    sp = cfg.selfplay
    if not re.match(r"^[a-z][a-z0-9_]*$", sp.game):
        raise ConfigError(f"selfplay.game = '{sp.game}' must be a module name of shoal/selfplay/games/, "
                          f"e.g. 'connect4'")
    sims = [int(n) if isinstance(n, str) and n.strip().isdigit() else n for n in sp.eval_mcts_simulations]
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sims):
        raise ConfigError(f"selfplay.eval_mcts_simulations = {sims!r} must be a list of positive simulation "
                          f"counts, e.g. [200, 1000]")
    sp.eval_mcts_simulations = sims  # `key=200,1000` on the command line arrives as strings
    if sp.eval_games % 2:
        raise ConfigError(f"selfplay.eval_games = {sp.eval_games} must be even: half the games with each colour")
    if sp.batch_size % cfg.launch.nproc:
        raise ConfigError(f"selfplay.batch_size = {sp.batch_size} must divide among the launch.nproc = "
                          f"{cfg.launch.nproc} learner ranks")
    if cfg.parallel.tp != 1 or cfg.parallel.pp != 1 or cfg.parallel.dp_shard != 1:
        raise ConfigError("parallel: the self-play learner is data parallel only (DDP over launch.nproc ranks); "
                          "leave parallel.tp, parallel.pp and parallel.dp_shard at 1")
    if cfg.sync.method != "allreduce" or cfg.sites.name:
        raise ConfigError(f"sync.method = '{cfg.sync.method}': the self-play learner averages gradients every "
                          f"step (sync.method = 'allreduce', no sites)")


SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A site's name: also its certificate's common name (shoal/federated/certs.py's NAME_RE)."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def split_endpoint(where: str, value: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') as (host, port); ConfigError naming `where` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} = '{value}' must look like host:port (e.g. 10.0.0.1:7443)")
    return host, int(port)


def site_peers(cfg: Config) -> dict[str, tuple[str, int]]:
    """sites.peers as {name: (host, port)}, checked."""
    peers: dict[str, tuple[str, int]] = {}
    for item in cfg.sites.peers:
        name, sep, endpoint = str(item).partition("=")
        if not sep or not re.match(SITE_NAME, name.strip()):
            raise ConfigError(f"sites.peers entry '{item}' must look like name=host:port with a site name of "
                              f"letters, digits, '.', '_' or '-'")
        name = name.strip()
        if name == cfg.sites.name or name in peers:
            raise ConfigError(f"sites.peers names '{name}' twice (or this site itself); each other site once")
        peers[name] = split_endpoint(f"sites.peers[{name}]", endpoint.strip())
    return peers


def validate_sites(cfg: Config) -> None:
    """The [sites] rules: names, endpoints, DiLoCo as the only thing crossing, and no c10d/Gloo port facing
    the other sites."""
    sites = cfg.sites
    if not re.match(SITE_NAME, sites.name):
        raise ConfigError(f"sites.name = '{sites.name}' must be letters, digits, '.', '_' or '-' (its certificate's name)")
    listen_host, _ = split_endpoint("sites.listen", sites.listen)
    peers = site_peers(cfg)
    if not peers:
        raise ConfigError("sites.peers is empty: list the other sites as [\"name=host:port\"]")
    if not sites.certs:
        raise ConfigError("sites.certs is empty: the folder `shoal sites certs --out DIR` wrote")
    if sites.internal in ("", "0.0.0.0", "::", "*"):
        raise ConfigError(f"sites.internal = '{sites.internal}' would open the site's c10d store and Gloo on every "
                          f"interface, the other sites' side included; give loopback or the site's own network")
    if sites.internal == listen_host and listen_host not in LOOPBACK:
        raise ConfigError(f"sites.internal = '{sites.internal}' is the address the other sites reach (sites.listen); "
                          f"the c10d store and Gloo must use the site's own network")
    if sites.internal in {host for host, _ in peers.values()} and sites.internal not in LOOPBACK:
        raise ConfigError(f"sites.internal = '{sites.internal}' is another site's address (sites.peers)")
    if cfg.sync.method != "diloco":
        raise ConfigError(f"sync.method = '{cfg.sync.method}': between sites only DiLoCo's outer sync crosses; "
                          f"set sync.method = 'diloco'")
    if cfg.sync.fragments != 1 or cfg.sync.overlap:
        raise ConfigError("sync.fragments and sync.overlap: sites sync the whole model at once (fragments = 1, "
                          "overlap = false)")
    if cfg.sync.compression not in ("auto", "none", "fp4", "topk"):
        raise ConfigError(f"sync.compression = '{cfg.sync.compression}' is a collective of its own; between sites "
                          f"the outer gradient travels as 'none' (fp32), 'fp4' or 'topk'")
    if cfg.fault.enabled:
        raise ConfigError("fault.enabled: per-step fault tolerance inside a site is not combined with sites yet; "
                          "a lost site is dropped after sites.grace_seconds")


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, the form written to every run directory."""
    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def reference(markdown: bool = False) -> str:
    """Every field with its default and one-line doc: `shoal config` and docs/config.md."""
    out: list[str] = []
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        defaults = cls()
        out.append(f"## [{section}]\n" if markdown else f"[{section}]")
        if markdown:
            out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            meta = f.metadata
            extra = ""
            if meta.get("choices"):
                extra = " One of: " + ", ".join(map(str, meta["choices"])) + "."
            default = getattr(defaults, f.name)
            if markdown:
                out.append(f"| `{f.name}` | {types[f.name].__name__} | `{default!r}` | {meta['help']}{extra} |")
            else:
                out.append(f"  {f.name} = {default!r}  ({types[f.name].__name__})\n      {meta['help']}{extra}")
        out.append("")
    return "\n".join(out)
