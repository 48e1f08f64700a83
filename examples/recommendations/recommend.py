"""Each user's top-k items from a trained DLRM run: candidates -> `shoal predict` -> top k.

    python examples/recommendations/recommend.py candidates --users 200 --out candidates.parquet
    shoal predict runs/recommendations --data candidates.parquet --out scores --nproc 2
    python examples/recommendations/recommend.py top --scores scores --k 10 --out top10.parquet

`candidates` writes one row per (user, item) pair for the first --users users and every
item of the click log, in the column order the model was trained on (4 dense features,
then user, item, category, device ids). The dense features are the context of the visit;
they are set to 0 (their mean in the training log), and category and device to the
values given (the generated log draws them independently of the item). The row id is
user x items + item. `top` reads the Parquet parts `shoal predict` wrote (listed in its
index.json) one at a time, and keeps each user's k highest click probabilities.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shoal.data.clicks import DENSE_FEATURES, TABLE_SIZES

ITEMS = TABLE_SIZES[1]


def write_candidates(users: int, category: int, device: int, out: Path) -> None:
    user = np.repeat(np.arange(users), ITEMS)
    item = np.tile(np.arange(ITEMS), users)
    columns = {"id": user * ITEMS + item}
    columns.update({f"dense_{i}": np.zeros(len(user), np.float32) for i in range(DENSE_FEATURES)})
    columns.update({"user": user, "item": item, "category": np.full(len(user), category),
                    "device": np.full(len(user), device)})
    pq.write_table(pa.table(columns), out, row_group_size=65536)
    print(f"{out}: {len(user)} candidates ({users} users x {ITEMS} items)")


def top_k(scores: Path, k: int, out: Path) -> None:
    index = json.loads((scores / "index.json").read_text())
    best: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for part in index["parts"]:
        table = pq.read_table(scores / part["file"], columns=["id", "score"])
        ids, score = table.column("id").to_numpy(), table.column("score").to_numpy()
        for user in np.unique(ids // ITEMS):
            mine = ids // ITEMS == user
            items, values = ids[mine] % ITEMS, score[mine]
            if user in best:  # a user's candidates may span two parts
                items, values = np.concatenate([best[user][0], items]), np.concatenate([best[user][1], values])
            keep = np.argsort(-values, kind="stable")[:k]
            best[int(user)] = items[keep], values[keep]
    users = sorted(best)
    table = pa.table({"user": np.repeat(users, [len(best[u][0]) for u in users]),
                      "rank": np.concatenate([np.arange(1, len(best[u][0]) + 1) for u in users]),
                      "item": np.concatenate([best[u][0] for u in users]),
                      "score": np.concatenate([best[u][1] for u in users])})
    pq.write_table(table, out)
    print(f"{out}: top {k} items for {len(users)} users; user {users[0]}: items "
          f"{[int(i) for i in best[users[0]][0][:5]]} ...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cand = sub.add_parser("candidates", help="write every user x item pair as Parquet rows")
    cand.add_argument("--users", type=int, default=200, help=f"first N users (of {TABLE_SIZES[0]})")
    cand.add_argument("--category", type=int, default=0)
    cand.add_argument("--device", type=int, default=0)
    cand.add_argument("--out", type=Path, default=Path("candidates.parquet"))
    top = sub.add_parser("top", help="each user's k best items from shoal predict's output")
    top.add_argument("--scores", type=Path, required=True, help="the --out folder of shoal predict")
    top.add_argument("--k", type=int, default=10)
    top.add_argument("--out", type=Path, default=Path("top.parquet"))
    args = parser.parse_args()
    if args.command == "candidates":
        write_candidates(args.users, args.category, args.device, args.out)
    else:
        top_k(args.scores, args.k, args.out)


if __name__ == "__main__":
    main()
