"""The sections of Shoal's other ways to run, each empty or off unless set: [federated] (`shoal fed`:
rounds between organisations that keep their data, docs/federated.md), [sites] (one run over several
sites that exchange only DiLoCo's outer step over mutual TLS, docs/sites.md) and [selfplay]
(AlphaZero self-play: actors, a learner and an evaluator, docs/selfplay.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.config.fields import option


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
    value_target_q: float = option(0.0, "Weight w of the search's own value in the value target, z' = (1 - w) "
                                        "z + w q, with z the game's result and q the root search's mean value "
                                        "for the mover (Prasad et al., 'Lessons from AlphaZero'). 0 is "
                                        "AlphaZero's z alone.", min=0.0, max=1.0)
    replay_size: int = option(50_000, "Positions the learner's replay buffer holds; the oldest leave first.",
                              min=1)
    games_per_version: int = option(64, "New games the learner ingests before each weight version.", min=1)
    train_steps_per_version: int = option(40, "Optimizer steps per weight version.", min=1)
    batch_size: int = option(256, "Positions per optimizer step over all learner ranks.", min=1)
    augment: bool = option(True, "Train on a random one of the game's symmetric copies of each sampled "
                                 "position (the board's rotations and mirrors, as AlphaGo Zero did). false "
                                 "trains on the positions as played.")
    versions: int = option(100, "Weight versions to train; the run ends after the last one.", min=1)
    lr_final: float = option(1.0, "train.lr's multiplier at the end of the run (selfplay.versions or "
                                  "selfplay.minutes, whichever comes first), reached by a cosine from "
                                  "selfplay.lr_decay_from on. 1 keeps train.lr throughout.", min=0.0, max=1.0)
    lr_decay_from: float = option(0.5, "Share of the run (versions or minutes, whichever is further along) "
                                       "after which the learning rate decays to selfplay.lr_final.",
                                  min=0.0, max=1.0)
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
