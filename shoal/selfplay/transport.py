"""How weights reach the actors and games reach the learner: files in the run directory.

    <run dir>/selfplay/weights/v000012.safetensors   the learner's weight version 12
    <run dir>/selfplay/games/<batch id>.safetensors   one actor's batch of whole games
    <run dir>/selfplay/ledger.jsonl                   which batches each weight version ingested
    <run dir>/selfplay/finished | failed              the run's end, or why it cannot go on

Every file is written beside its final name and renamed over it (POSIX rename is atomic), so a
reader sees a whole file or none: an actor killed while writing leaves only a hidden `.tmp`
file, and its games are absent, never half there. Weights and games are safetensors (tensors
plus a JSON header), never pickles: nothing an actor wrote is unpickled by the learner.

A batch id is `<role><slot>-i<incarnation>-<counter>`: the launcher counts each slot's processes
(shoal/launch/actors.py), so a replacement never reuses its predecessor's ids, and the learner's
set of ingested ids (held in its checkpoint) keeps any batch from counting twice. A batch played
on another host arrives through shoal/selfplay/relay.py as `h<host>-<its id there>`, the host
numbered by the job, so ids from two hosts never meet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from shoal.runtime.protocol import SELFPLAY_INCARNATION_ENV as INCARNATION_ENV, SELFPLAY_ROLE_ENV as ROLE_ENV, \
    SELFPLAY_SLOT_ENV as SLOT_ENV  # the names shoal/launch/actors.py sets and selfplay/process.py reads

WEIGHTS_KEPT = 4  # older weight files are deleted; an actor reading one that just went retries
_VERSION = re.compile(r"^v(\d{6,})\.safetensors$")
BATCH_ID = re.compile(r"^(?:h(\d+)-)?(actor|evaluator)(\d+)-i(\d+)-(\d+)$")  # groups: host, role, slot, incarnation, counter


def selfplay_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "selfplay"


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


# --- weights -------------------------------------------------------------------------------

def weights_path(run_dir: Path, version: int) -> Path:
    return selfplay_dir(run_dir) / "weights" / f"v{version:06d}.safetensors"


def publish_weights(run_dir: Path, version: int, state: dict[str, torch.Tensor], keep_every: int = 0) -> Path:
    """Write weight version `version` for the actors, then drop versions older than the last few, except
    every `keep_every`-th (the evaluated ones, a history of the run's strength; 0 keeps none)."""
    from safetensors.torch import save_file
    path = weights_path(run_dir, version)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"version": str(version)}))
    _drop_old_weights(run_dir, keep_every)
    return path


def publish_weights_file(run_dir: Path, version: int, data: bytes) -> Path:
    """Write weight version `version` as the bytes of a safetensors file another host's learner
    published (shoal/selfplay/relay.py), and drop the versions before the last few."""
    path = weights_path(run_dir, version)
    _write_atomically(path, lambda tmp: tmp.write_bytes(data))
    _drop_old_weights(run_dir, 0)
    return path


def _drop_old_weights(run_dir: Path, keep_every: int) -> None:
    for old, old_path in weight_versions(run_dir)[:-WEIGHTS_KEPT]:
        if not (keep_every and old % keep_every == 0):
            old_path.unlink(missing_ok=True)


def withdraw_weights_after(run_dir: Path, version: int) -> list[int]:
    """Delete published versions after `version` (a resumed learner trains them again); their numbers."""
    gone = []
    for number, path in weight_versions(run_dir):
        if number > version:
            path.unlink(missing_ok=True)
            gone.append(number)
    return gone


def weight_versions(run_dir: Path) -> list[tuple[int, Path]]:
    folder = selfplay_dir(run_dir) / "weights"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _VERSION.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_version(run_dir: Path) -> int:
    """The newest published weight version, or -1 before the first."""
    versions = weight_versions(run_dir)
    return versions[-1][0] if versions else -1


def load_weights(run_dir: Path, version: int) -> dict[str, torch.Tensor] | None:
    """Weight version `version`, or None when it was deleted meanwhile (a newer one exists)."""
    from safetensors.torch import load_file
    try:
        return load_file(str(weights_path(run_dir, version)))
    except FileNotFoundError:
        return None


# --- games ---------------------------------------------------------------------------------

def batch_id(role: str, slot: int, incarnation: int, counter: int) -> str:
    return f"{role}{slot}-i{incarnation:03d}-{counter:06d}"


def games_path(run_dir: Path, batch: str) -> Path:
    return selfplay_dir(run_dir) / "games" / f"{batch}.safetensors"


def write_games(run_dir: Path, batch: str, records: list[Any]) -> Path:
    """Write a batch of game records (dataclasses whose fields are tensors or JSON values) as one
    file: tensor fields concatenated along their first dimension, with each game's row count."""
    from safetensors.torch import save_file
    if not records:
        raise ValueError("write_games: an empty batch")
    tensors: dict[str, torch.Tensor] = {}
    plain: list[dict[str, Any]] = []
    for field in dataclasses.fields(records[0]):
        values = [getattr(r, field.name) for r in records]
        if isinstance(values[0], torch.Tensor):
            tensors[field.name] = torch.cat([v.detach().to("cpu").reshape(v.shape[0] if v.dim() else 1, *v.shape[1:])
                                             for v in values]).contiguous()
            tensors[f"{field.name}.rows"] = torch.tensor([v.shape[0] if v.dim() else 1 for v in values])
    for r in records:
        plain.append({f.name: getattr(r, f.name) for f in dataclasses.fields(r)
                      if not isinstance(getattr(r, f.name), torch.Tensor)})
    meta = {"batch": batch, "games": str(len(records)), "plain": json.dumps(plain)}
    path = games_path(run_dir, batch)
    _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def write_games_file(run_dir: Path, batch: str, data: bytes) -> Path:
    """Write a batch that arrived as a file's bytes from another host (shoal/selfplay/relay.py): whole
    or not at all, like any batch; a ValueError when `batch` is not a batch id or the bytes are not a
    batch of games (nothing is left behind then)."""
    from safetensors import safe_open
    if not BATCH_ID.match(batch):
        raise ValueError(f"write_games_file: '{batch}' is not a batch id")
    path = games_path(run_dir, batch)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    try:
        with safe_open(str(tmp), framework="pt") as f:
            games = int(f.metadata()["games"])
            if games < 1 or "plain" not in f.metadata():
                raise ValueError(f"{games} games")
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"write_games_file: {batch} is not a batch of games ({err})") from None
    os.replace(tmp, path)
    return path


def local_batches(run_dir: Path) -> list[str]:
    """The complete batch files this host's actors wrote (no host prefix), in name order."""
    folder = selfplay_dir(run_dir) / "games"
    if not folder.is_dir():
        return []
    return sorted(name for path in folder.iterdir() if path.name.endswith(".safetensors")
                  and (m := BATCH_ID.match(name := path.name[:-len(".safetensors")])) and m.group(1) is None)


def read_games(run_dir: Path, batch: str, record_type: type) -> list[Any]:
    """The game records of one batch, as `record_type` instances."""
    from safetensors import safe_open
    with safe_open(str(games_path(run_dir, batch)), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    plain = json.loads(meta["plain"])
    records = []
    fields = {f.name for f in dataclasses.fields(record_type)}
    for index, values in enumerate(plain):
        for name in fields - set(values):
            rows = tensors[f"{name}.rows"]
            start = int(rows[:index].sum())
            values[name] = tensors[name][start:start + int(rows[index])]
        records.append(record_type(**values))
    return records


def pending_batches(run_dir: Path, ingested: set[str]) -> list[str]:
    """Complete batch files not ingested yet, in name order."""
    folder = selfplay_dir(run_dir) / "games"
    if not folder.is_dir():
        return []
    return sorted(name for path in folder.iterdir() if path.name.endswith(".safetensors")
                  and BATCH_ID.match(name := path.name[:-len(".safetensors")]) and name not in ingested)


def slot_has_batches(run_dir: Path, role: str, slot: int, incarnation: int) -> bool:
    """The process `incarnation` of this slot wrote at least one batch (it committed work)."""
    folder = selfplay_dir(run_dir) / "games"
    return folder.is_dir() and any(folder.glob(f"{role}{slot}-i{incarnation:03d}-*.safetensors"))


def next_incarnation(run_dir: Path, role: str, slot: int) -> int:
    """One past the highest incarnation of this slot that left batches (0 in a new run)."""
    folder = selfplay_dir(run_dir) / "games"
    seen = [int(m.group(4)) for path in (folder.iterdir() if folder.is_dir() else [])
            if (m := BATCH_ID.match(path.name.removesuffix(".safetensors"))) and m.group(1) is None
            and m.group(2) == role and int(m.group(3)) == slot]
    return max(seen) + 1 if seen else 0


# --- the ledger and the run's end ------------------------------------------------------------

def write_ledger(run_dir: Path, ledger: list[list[str]], lrs: list[float]) -> None:
    """The whole ledger (one line per weight version: the batches it ingested and the learning rate
    it trained at), replaced atomically."""
    text = "".join(json.dumps({"version": v + 1, "batches": b, "lr": lr}) + "\n"
                   for v, (b, lr) in enumerate(zip(ledger, lrs, strict=True)))
    _write_atomically(selfplay_dir(run_dir) / "ledger.jsonl", lambda tmp: tmp.write_text(text))


def append_ledger(run_dir: Path, version: int, batches: list[str], lr: float) -> None:
    path = selfplay_dir(run_dir) / "ledger.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps({"version": version, "batches": batches, "lr": lr}) + "\n")


def ledger_rows(run_dir: Path) -> list[dict]:
    """The ledger's lines in version order: {"version", "batches", "lr"} ("lr" absent in a ledger
    written before the learning rate was recorded)."""
    path = selfplay_dir(run_dir) / "ledger.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return sorted(rows, key=lambda row: row["version"])


def read_ledger(run_dir: Path, key: str = "batches") -> list:
    """Each weight version's `key` in version order: "batches" (the batch ids it ingested) or "lr"
    (None where the ledger has none)."""
    return [row.get(key) for row in ledger_rows(run_dir)]


def mark_finished(run_dir: Path) -> None:
    _write_atomically(selfplay_dir(run_dir) / "finished", lambda tmp: tmp.write_text("done\n"))


def finished(run_dir: Path) -> bool:
    return (selfplay_dir(run_dir) / "finished").is_file()


def mark_failed(run_dir: Path, reason: str) -> None:
    _write_atomically(selfplay_dir(run_dir) / "failed", lambda tmp: tmp.write_text(reason))


def failure(run_dir: Path) -> str | None:
    path = selfplay_dir(run_dir) / "failed"
    return path.read_text() if path.is_file() else None


def clear_marks(run_dir: Path) -> None:
    """A run that starts (or resumes) is neither finished nor failed."""
    for name in ("finished", "failed"):
        (selfplay_dir(run_dir) / name).unlink(missing_ok=True)


def batch_games(run_dir: Path, batch: str) -> int:
    """Games in a batch file, from its header alone."""
    from safetensors import safe_open
    with safe_open(str(games_path(run_dir, batch)), framework="pt") as f:
        return int(f.metadata()["games"])
