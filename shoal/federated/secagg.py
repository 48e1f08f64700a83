"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017 (the semi-honest server variant, without the consistency-check signatures).

Each client u holds two X25519 key pairs (c for encrypting shares, s for masks) and a random
self-mask seed b_u. It Shamir-shares b_u and s_u's private key among all clients (threshold t),
sending each share AES-GCM-encrypted under an X25519+HKDF key, through the server. Its masked
input is y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)  (mod 2^64), where s_uv
is the X25519 agreement of u's and v's mask keys; PRG is ChaCha20's keystream. Pairwise masks
cancel in the sum; the server removes self masks with b_u rebuilt from t shares, and a dropped
client's pairwise masks with its s key rebuilt from t shares. A client refuses to reveal both
secrets of the same peer, which is what keeps one input hidden.

Floats are fixed-point with `SCALE_BITS` fractional bits in two's complement mod 2^64.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PRIME = 2 ** 521 - 1  # a Mersenne prime above every 32-byte secret
SHARE_BYTES = 66
SHARE_CIPHERTEXT_BYTES = 12 + 2 * SHARE_BYTES + 16  # nonce, a seed share and a key share, the GCM tag
SCALE_BITS = 24


# --- Shamir secret sharing over GF(PRIME) ---------------------------------------------------

def shamir_split(secret: int, n: int, threshold: int) -> list[tuple[int, int]]:
    """n shares (x, y) of `secret`; any `threshold` of them rebuild it, fewer reveal nothing."""
    if not 0 <= secret < PRIME or not 1 <= threshold <= n:
        raise ValueError(f"cannot split into {n} shares with threshold {threshold}")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner's rule
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_combine(shares: list[tuple[int, int]]) -> int:
    """Lagrange interpolation at 0."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate share coordinates")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# --- primitives from `cryptography` -----------------------------------------------------------

def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint64 from a 32-byte seed (ChaCha20 keystream)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def prg_word(seed: bytes, index: int) -> int:
    """Word `index` of `prg(seed, ...)` alone: ChaCha20 from the block that holds it (the nonce's first 4
    bytes are the block counter). Revealing one keystream word reveals nothing of the others."""
    block, offset = divmod(index, 8)
    nonce = block.to_bytes(4, "little") + b"\0" * 12
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(64))
    return int(np.frombuffer(stream, dtype="<u8")[offset])


def agree(private: X25519PrivateKey, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both sides derive: X25519 then HKDF-SHA256, separated by purpose."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"shoal-secagg-" + purpose).derive(shared)


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def quantize(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 2.0 ** SCALE_BITS).astype(np.int64).view(np.uint64)


def dequantize(values: np.ndarray) -> np.ndarray:
    return values.view(np.int64).astype(np.float64) / 2.0 ** SCALE_BITS


def _index(ids: list[str]) -> dict[str, int]:
    """Share x-coordinates: 1-based position in the sorted list of clients that advertised keys."""
    return {cid: i + 1 for i, cid in enumerate(sorted(ids))}


# --- the two roles ----------------------------------------------------------------------------

class SecAggClient:
    """One client's side of one round."""

    def __init__(self, client_id: str, threshold: int):
        self.client_id, self.threshold = client_id, threshold
        self.cipher_key, self.mask_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.seed = os.urandom(32)
        self.peers: dict[str, tuple[bytes, bytes]] = {}
        self.received: dict[str, bytes] = {}

    def public_keys(self) -> tuple[bytes, bytes]:
        return _raw_public(self.cipher_key), _raw_public(self.mask_key)

    def share_keys(self, peers: dict[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Encrypted shares of (b_u, s_u private key), one per peer (including itself)."""
        if self.client_id not in peers or len(peers) < self.threshold:
            raise ValueError(f"secure aggregation needs {self.threshold} clients, {len(peers)} advertised keys")
        if len({pk for pk, _ in peers.values()}) != len(peers):
            raise ValueError("two peers advertised the same key")
        self.peers = peers
        index = _index(list(peers))
        mask_secret = self.mask_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        seed_shares = shamir_split(int.from_bytes(self.seed, "big"), len(peers), self.threshold)
        key_shares = shamir_split(int.from_bytes(mask_secret, "big"), len(peers), self.threshold)
        out = {}
        for peer, (cipher_pk, _) in peers.items():
            x = index[peer]
            plain = (seed_shares[x - 1][1].to_bytes(SHARE_BYTES, "big")
                     + key_shares[x - 1][1].to_bytes(SHARE_BYTES, "big"))
            nonce = os.urandom(12)
            key = agree(self.cipher_key, cipher_pk, b"share")
            out[peer] = nonce + AESGCM(key).encrypt(nonce, plain, f"{self.client_id}|{peer}".encode())
        return out

    def mask(self, values: np.ndarray, received: dict[str, bytes]) -> np.ndarray:
        """y_u: the quantised input plus the self mask and the pairwise masks with every sender."""
        if self.client_id not in received or len(received) < self.threshold:
            raise ValueError(f"only {len(received)} clients shared keys; secure aggregation needs {self.threshold}")
        unknown = set(received) - set(self.peers)
        if unknown:
            raise ValueError(f"shares from clients that advertised no keys: {sorted(unknown)}")
        self.received = received
        masked = quantize(values) + prg(self.seed, len(values))
        for peer in received:
            if peer == self.client_id:
                continue
            pairwise = prg(agree(self.mask_key, self.peers[peer][1], b"mask"), len(values))
            masked = masked + pairwise if self.client_id < peer else masked - pairwise
        return masked

    def pairwise_words(self, index: int) -> dict[str, int]:
        """For each peer that shared keys with us, word `index` of our pairwise mask with it: the server needs
        them only to read one public coordinate (the weight the server itself assigned) of one input."""
        return {peer: prg_word(agree(self.mask_key, self.peers[peer][1], b"mask"), index)
                for peer in self.received if peer != self.client_id}

    def _decrypt(self, owner: str) -> tuple[bytes, bytes]:
        blob = self.received[owner]
        key = agree(self.cipher_key, self.peers[owner][0], b"share")
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], f"{owner}|{self.client_id}".encode())
        return plain[:SHARE_BYTES], plain[SHARE_BYTES:]

    def unmask(self, survivors: list[str], dropped: list[str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Shares of survivors' self-mask seeds and of dropped clients' mask keys."""
        if set(survivors) & set(dropped):
            raise ValueError("the server asked for both secrets of the same client; refusing")
        if len(survivors) < self.threshold:
            raise ValueError(f"only {len(survivors)} survivors; secure aggregation needs {self.threshold}")
        if not set(survivors) | set(dropped) <= set(self.received):
            raise ValueError("unmask request names clients that shared no keys with this client")
        return ({owner: self._decrypt(owner)[0] for owner in survivors},
                {owner: self._decrypt(owner)[1] for owner in dropped})


class SecAggServer:
    """Rebuilds the sum from the masked inputs and the revealed shares."""

    def __init__(self, threshold: int):
        self.threshold = threshold

    def unmask_sum(self, peers: dict[str, tuple[bytes, bytes]], shared: set[str], masked: dict[str, np.ndarray],
                   seed_shares: dict[str, dict[str, bytes]], key_shares: dict[str, dict[str, bytes]]) -> np.ndarray:
        """Sum of the survivors' inputs (uint64). `seed_shares[owner][holder]` is holder's share of owner's seed."""
        index = _index(list(peers))
        length = len(next(iter(masked.values())))
        total = np.zeros(length, dtype=np.uint64)
        for vector in masked.values():
            total = total + vector
        for owner in masked:
            total = total - prg(self._rebuild(seed_shares.get(owner, {}), index, owner), length)
        for owner in shared - set(masked):
            secret = self._rebuild(key_shares.get(owner, {}), index, owner)
            dropped_key = X25519PrivateKey.from_private_bytes(secret)
            for survivor in masked:
                pairwise = prg(agree(dropped_key, peers[survivor][1], b"mask"), length)
                # undo what the survivor added for this peer
                total = total - pairwise if survivor < owner else total + pairwise
        return total

    def inputs_at(self, slot: int, peers: dict[str, tuple[bytes, bytes]], shared: set[str],
                  masked: dict[str, np.ndarray], seed_shares: dict[str, dict[str, bytes]],
                  key_shares: dict[str, dict[str, bytes]],
                  words: dict[str, dict[str, int]]) -> tuple[dict[str, np.ndarray], set[str]]:
        """Each survivor's own input at one coordinate (only where that coordinate is public, as the weight
        the server assigned), from its masked input, its rebuilt self mask and the pairwise words it
        reported (`words[u][v]`); and the survivors whose words are disputed. Both ends of a pair derive
        the same word, and the server derives a dropped peer's itself, so a word that disagrees is a lie
        by one end; such a survivor's input is not computed (returned in the disputed set instead)."""
        index = _index(list(peers))
        survivors = sorted(masked)
        dropped_keys = {owner: X25519PrivateKey.from_private_bytes(self._rebuild(key_shares.get(owner, {}), index,
                                                                                 owner))
                        for owner in sorted(shared - set(masked))}
        disputed: set[str] = set()
        for i, u in enumerate(survivors):
            for v in survivors[i + 1:]:
                if words[u].get(v) is None or words[u].get(v) != words[v].get(u):
                    disputed |= {u, v}
            for owner, key in dropped_keys.items():
                if words[u].get(owner) != prg_word(agree(key, peers[u][1], b"mask"), slot):
                    disputed.add(u)
        values = {}
        for u in survivors:
            if u in disputed:
                continue
            word = int(masked[u][slot]) - prg_word(self._rebuild(seed_shares.get(u, {}), index, u), slot)
            for v in shared - {u}:
                word += -words[u][v] if u < v else words[u][v]  # undo what u added for v
            values[u] = np.array([word % 2 ** 64], dtype=np.uint64)
        return values, disputed

    def _rebuild(self, shares: dict[str, bytes], index: dict[str, int], owner: str) -> bytes:
        if len(shares) < self.threshold:
            raise ValueError(f"only {len(shares)} shares of {owner}'s secret; need {self.threshold}")
        chosen = list(shares.items())[:self.threshold]
        points = [(index[holder], int.from_bytes(value, "big")) for holder, value in chosen]
        secret = shamir_combine(points)
        if secret >= 2 ** 256:  # a bad share: the true secret is a 32-byte value
            raise ValueError(f"the shares of {owner}'s secret do not combine into a 32-byte value")
        return secret.to_bytes(32, "big")
