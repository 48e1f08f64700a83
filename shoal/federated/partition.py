"""The simulator's data: a bundled dataset, dealt to many virtual clients (IID, Dirichlet, shards).

Dirichlet: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019 (arXiv:1909.06335) -- each class is split among the clients in
proportions drawn from Dir(alpha). Shards: McMahan et al. 2017 -- sort by label, cut into
`clients * shards_per_client` shards, give each client that many shards at random.
Every sample goes to exactly one client; some clients may get none when samples are few.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shoal.config import Config, ConfigError


def partition(labels: np.ndarray, clients: int, method: str, *, alpha: float = 0.5, shards_per_client: int = 2,
              seed: int = 0) -> list[np.ndarray]:
    """Sample indices for each client."""
    rng = np.random.default_rng(seed)
    if clients < 1:
        raise ConfigError("the number of clients must be at least 1")
    if method == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), clients)]
    if method == "dirichlet":
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            ids = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(ids)).astype(int)
            for client, chunk in enumerate(np.split(ids, cuts)):
                parts[client].extend(chunk.tolist())
        return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    if method == "shards":
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, clients * shards_per_client)
        dealt = rng.permutation(len(shards))
        return [np.sort(np.concatenate([shards[s] for s in dealt[c::clients]])) for c in range(clients)]
    raise ConfigError(f"partition '{method}' is unknown (valid: iid, dirichlet, shards)")


def load_sim_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); the test split stays on the server for evaluation."""
    source = cfg.federated.sim_data
    if source in ("digits", "breast_cancer"):
        x, y = _bundled(source)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # both ship unscaled; standardise per feature
        order = np.random.default_rng(cfg.train.seed).permutation(len(x))
        n_test = max(1, int(len(x) * 0.2))
        test, train = order[:n_test], order[n_test:]
        return (torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[test]),
                torch.from_numpy(y[test]))
    from shoal.data import build_dataset

    train, test, spec = build_dataset(cfg.data, cfg.train.seed)
    if spec.kind != "classes":
        raise ConfigError(f"federated.sim_data = 'data' needs class labels; [data] gives '{spec.kind}'")
    x, y = train.get(torch.arange(len(train)))
    xt, yt = test.get(torch.arange(len(test)))
    return x, y.long(), xt, yt.long()


def _bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A dataset that ships inside scikit-learn. Digits is read straight from its csv.gz (the
    format `load_digits` reads), which spares the seconds `import sklearn` costs each run."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"federated.sim_data = '{name}' needs scikit-learn (pip install 'shoal[federated]')")
    digits = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if name == "digits" and digits.is_file():
        table = np.loadtxt(digits, delimiter=",", dtype=np.float32)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn import datasets as sk

    bunch = sk.load_digits() if name == "digits" else sk.load_breast_cancer()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)
