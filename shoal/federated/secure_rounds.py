"""A secure-aggregation round on the server: Bonawitz et al.'s four phases, then the checked sum.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(the cryptography is in `secagg.py`). The server sees no single update, so it cannot judge one;
what it can check, it does: each client's weight is set by the server from the sample count
that client declared at Join (sent in its task), and the unmasked weight slot must equal the
sum of the survivors' weights, so a forged weight, a forged masked vector or a bad share is
caught and the round refused. The mean then goes through the same guards as a plain round's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from shoal.config import Config
from shoal.federated import federation_pb2 as pb
from shoal.federated.secagg import SecAggServer, dequantize

log = logging.getLogger("shoal.federated.server")
KEY_BYTES = 32
WEIGHT_TOLERANCE = 1e-3  # weights are whole numbers; fixed point rounds each to 2^-24, so this is far looser


def secagg_threshold(cfg: Config, sampled: int) -> int:
    return cfg.federated.secagg_threshold or sampled // 2 + 1


class SecureRounds:
    """Mixed into RoundDriver: needs its phase(), mailbox, aggregator, global model and config."""

    def client_weight(self, client_id: str) -> float:
        """Weight 1 under central DP (every update clipped alike), else the count declared at Join."""
        return 1.0 if self.dp is not None else float(self.mailbox.clients[client_id].num_samples)

    def secure_round(self, rnd: int, chosen: list[str], config: dict[str, float],
                     available: int) -> tuple[int, float]:
        threshold = secagg_threshold(self.cfg, len(chosen))
        config = {**config, "secagg": 1.0, "secagg_threshold": float(threshold)}
        if self.dp is not None:
            config["dp_clip"] = self.dp.clip  # clients clip: the server never sees one update

        def with_weight(cid: str) -> dict[str, Any]:
            return {"config": {**config, "secagg_weight": self.client_weight(cid)}}

        keys = self.phase(pb.Task.TRAIN, rnd, chosen, model=self.model_bytes(), per_client=with_weight)
        if not self._enough(rnd, "advertised keys", keys, threshold):
            return 0, math.nan
        peers = {cid: k for cid, (k, _) in keys.items()}
        peer_msgs = [pb.PublicKeys(client_id=c, cipher_pk=k[0], mask_pk=k[1]) for c, k in sorted(peers.items())]
        shares = self.phase(pb.Task.SHARE_KEYS, rnd, sorted(peers), peers=peer_msgs, config=config)
        if not self._enough(rnd, "shared keys", shares, threshold):
            return 0, math.nan

        def addressed_to(cid: str) -> dict[str, Any]:
            return {"shares": [pb.EncryptedShare(sender=s, recipient=cid, ciphertext=out[cid])
                               for s, out in sorted(shares.items())]}

        masked = self.phase(pb.Task.MASK, rnd, sorted(shares), per_client=addressed_to, config=config)
        if not self._enough(rnd, "sent masked input", masked, threshold):
            return 0, math.nan
        survivors, dropped = sorted(masked), sorted(set(shares) - set(masked))
        unmask = self.phase(pb.Task.UNMASK, rnd, survivors, survivors=survivors, dropped=dropped, config=config)
        if not self._enough(rnd, "sent unmasking shares", unmask, threshold):
            return 0, math.nan
        seed_shares: dict[str, dict[str, bytes]] = {}
        key_shares: dict[str, dict[str, bytes]] = {}
        words = {holder: w for holder, (_, _, w) in unmask.items()}
        for holder, (seeds, ks, _) in unmask.items():
            for owner, value in seeds.items():
                seed_shares.setdefault(owner, {})[holder] = value
            for owner, value in ks.items():
                key_shares.setdefault(owner, {})[holder] = value
        try:
            total = SecAggServer(threshold).unmask_sum(peers, set(shares), masked, seed_shares, key_shares)
        except ValueError as err:
            log.error("round %d: secure aggregation failed (%s); the global model is unchanged", rnd, err)
            return 0, math.nan
        if dropped:
            log.info("round %d: %s dropped after sharing keys; their masks were removed", rnd, dropped)
        summed = torch.from_numpy(dequantize(total))
        delta_sum, weight, unclipped = summed[:self.length], float(summed[self.length]), float(summed[-1])
        expected = sum(self.client_weight(cid) for cid in survivors)
        if not abs(weight - expected) <= WEIGHT_TOLERANCE or not -WEIGHT_TOLERANCE <= unclipped <= (
                len(survivors) + WEIGHT_TOLERANCE if self.dp is not None else WEIGHT_TOLERANCE):
            log.error("round %d: the unmasked weights are %.6g (unclipped slot %.6g) where the survivors %s were "
                      "given %.6g: a client forged its weight or its masked input, or sent bad shares; the global "
                      "model is unchanged", rnd, weight, unclipped, survivors, expected)
            if not abs(weight - expected) <= WEIGHT_TOLERANCE and set(words) == set(survivors):
                self._exclude_weight_forgers(rnd, threshold, peers, set(shares), masked, seed_shares, key_shares,
                                             words)
            return 0, math.nan
        self.global_params = self.aggregator.from_sum(rnd, self.global_params, delta_sum, expected, len(chosen),
                                                      unclipped, len(chosen) / available, survivors)
        losses = [m.get("train_loss", math.nan) for _, m in keys.values()]
        return len(masked), float(sum(losses) / len(losses))

    def _exclude_weight_forgers(self, rnd: int, threshold: int, peers: dict[str, tuple[bytes, bytes]],
                                shared: set[str], masked: dict[str, Any], seed_shares: dict[str, dict[str, bytes]],
                                key_shares: dict[str, dict[str, bytes]], words: dict[str, dict[str, int]]) -> None:
        """Find who broke the weight check and exclude them from every later round: the weight slot is public
        (the server assigned it), so each survivor's own weight is read from its masked input, its self mask
        and the pairwise mask words it reports at that slot alone; no update coordinate is revealed."""
        try:
            values, disputed = SecAggServer(threshold).inputs_at(self.length, peers, shared, masked, seed_shares,
                                                                 key_shares, words)
        except ValueError as err:
            log.error("round %d: the weight check cannot name who broke it (%s)", rnd, err)
            return
        forgers = sorted(cid for cid, value in values.items()
                         if not abs(float(dequantize(value)[0]) - self.client_weight(cid)) <= WEIGHT_TOLERANCE)
        guilty = sorted(set(forgers) | disputed)
        if not guilty:
            log.error("round %d: every survivor's own weight is as assigned; the shares or masked updates were bad, "
                      "and no single site can be named", rnd)
            return
        for cid in forgers:
            log.error("round %d: site '%s' sent weight %.6g where the server assigned %.6g; it is excluded from the "
                      "rest of the federation", rnd, cid, float(dequantize(values[cid])[0]), self.client_weight(cid))
        if disputed:
            log.error("round %d: sites %s reported pairwise mask words their peers contradict (one end of each such "
                      "pair lies); they are excluded from the rest of the federation", rnd, sorted(disputed))
        self.mailbox.exclude(guilty)
        self.round_log.event("sites_excluded", round=rnd, forged_weight=forgers, disputed_words=sorted(disputed))

    def _enough(self, rnd: int, what: str, replies: dict[str, Any], threshold: int) -> bool:
        if len(replies) >= threshold:
            return True
        log.error("round %d: only %d clients %s, below the secure aggregation threshold %d; the global model "
                  "is unchanged", rnd, len(replies), what, threshold)
        return False
