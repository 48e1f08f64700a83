"""Mutual TLS 1.3 between site leaders, and the frames that travel inside it.

TLS is the standard library's `ssl` (OpenSSL): both ends present a certificate of the job's CA
(`shoal sites certs`), the CRL is checked by OpenSSL during the handshake (`VERIFY_CRL_CHECK_LEAF`,
so a revoked certificate never completes one), and TLS 1.3 is the minimum. The CRL is read and
checked (signed by the CA, not expired) before each handshake; without a valid one no handshake
starts: the plane fails closed. A peer's identity is its certificate's common name, compared with
the name the config expects before any frame is read.

A frame is a fixed 24-byte header (magic, kind, outer round, payload length) and the payload.
The length is checked against the largest legitimate message of its kind (`message_limits`:
the model's outer state for a STATE, an fp32 outer gradient, a third of one for a shard) before a byte of the payload is read, so an oversized message costs nothing.
Payloads are raw little-endian tensors (after a digest, and for an outer gradient the sender's inner
step, an 8-byte big-endian integer), a SHA-256 digest, or safetensors (whose JSON metadata carries
the map of steps); nothing is unpickled.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from shoal.config import ConfigError
from shoal.federated import certs

MAGIC = b"SHS1"
HEADER = struct.Struct("!4sB3xQQ")  # magic, kind, padding, outer round, payload bytes
MARGIN = 1024 * 1024  # room beside the model in one message: safetensors' header, digests
HANDSHAKE_SECONDS = 10.0

# Frame kinds. STATUS: (round, digest of the outer model) after each round and on connecting.
# CONTRIB: a round's whole outer gradient (digest of the outer model it starts from, the sender's inner
# step at the round (STEP: which of its steps the gradient holds, shoal/sites/lineage.py), the payload),
# what each site sends every other at 2 sites, or with an encoding. At 3 sites or more the fp32
# outer gradient travels in shards (shoal/sites/sharded.py): SHARD carries the receiver's shard of
# the sender's gradient (and its STEP), AVERAGE the shard's average from its owner, REPAIR the
# shards whose owner was lost between the two. DROP: "you are not in my average of this round".
# JOIN: "send me your state after your next round". STATE: outer model and outer momentum,
# safetensors, with the steps of each site the model holds in its metadata (lineage.py).
STATUS, CONTRIB, DROP, JOIN, STATE, SHARD, AVERAGE, REPAIR = 1, 2, 3, 4, 5, 6, 7, 8
KIND_NAMES = {STATUS: "status", CONTRIB: "outer gradient", DROP: "drop", JOIN: "join", STATE: "state",
              SHARD: "outer shard", AVERAGE: "averaged shard", REPAIR: "repair shard"}
GRADIENT_KINDS = (CONTRIB, SHARD, AVERAGE, REPAIR)  # the kinds that carry outer-gradient values
DIGEST_BYTES = 32
STEP = struct.Struct("!Q")  # the sender's inner step at the round, in CONTRIB and SHARD frames
SHARDED_FROM = 3  # sites in a round from which the fp32 exchange is sharded (at 2 both ways cost the same)


class Refused(Exception):
    """A connection or message refused; the text says why and names the peer."""


def message_limits(num_params: int) -> dict[int, int]:
    """The largest message of each kind a site accepts: the largest it can legitimately be, plus 1 MiB.

    A STATE is the outer model and its momentum in fp32; an outer gradient at most the model in fp32
    (the encodings are smaller) with a digest and a step; a shard or averaged shard at most a third of it (shards
    exist from 3 sites on); a REPAIR carries the lost owners' shards and the sender's own, so up to a whole gradient;
    the others a digest at most.
    """
    gradient = DIGEST_BYTES + STEP.size + 4 * num_params
    shard = DIGEST_BYTES + STEP.size + 4 * -(-num_params // SHARDED_FROM)
    limits = {STATUS: DIGEST_BYTES, DROP: 0, JOIN: 0, STATE: 8 * num_params, CONTRIB: gradient,
              SHARD: shard, AVERAGE: shard, REPAIR: gradient}
    return {kind: size + MARGIN for kind, size in limits.items()}


def _context(certs_dir: Path, name: str, server: bool) -> ssl.SSLContext:
    """A TLS 1.3 context with this site's certificate, the job's CA and its CRL (checked first)."""
    for needed in ("ca.pem", f"{name}.pem", f"{name}.key"):
        if not (certs_dir / needed).is_file():
            raise ConfigError(f"sites.certs: {certs_dir / needed} not found (make it with `shoal sites certs`)")
    # Fails closed: a missing, forged or expired CRL raises here, before any handshake.
    if not (certs_dir / "crl.pem").is_file():
        raise ConfigError(f"sites.certs: {certs_dir / 'crl.pem'} is missing; no site is let in without it")
    certs.load_crl(certs_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # identity is the certificate's common name, checked in `peer_name`
    context.load_cert_chain(certs_dir / f"{name}.pem", certs_dir / f"{name}.key")
    context.load_verify_locations(cafile=certs_dir / "ca.pem")
    context.load_verify_locations(cafile=certs_dir / "crl.pem")  # OpenSSL reads the CRL from a PEM file
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if server:
        # No session tickets: links are long-lived, and without post-handshake messages a link's
        # reading and writing threads never touch the TLS state machine at the same time.
        context.num_tickets = 0
    return context


def server_context(certs_dir: Path, name: str) -> ssl.SSLContext:
    return _context(certs_dir, name, server=True)


def client_context(certs_dir: Path, name: str) -> ssl.SSLContext:
    return _context(certs_dir, name, server=False)


def peer_name(sock: ssl.SSLSocket) -> str:
    """The common name of the certificate the peer presented; Refused when it cannot name a site."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise Refused("no certificate")
    cert = x509.load_der_x509_certificate(der)
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise Refused("a CA certificate cannot name a site")
    except x509.ExtensionNotFound:
        raise Refused("certificate without basicConstraints") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise Refused("certificate without a common name")
    return str(names[0].value)


def connect(host: str, port: int, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    """A TCP connection and a completed TLS handshake (TLS 1.3) to a peer's listener."""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        sock = context.wrap_socket(raw, server_side=False)
    except BaseException:
        raw.close()
        raise
    assert sock.version() == "TLSv1.3", "minimum_version is TLS 1.3"
    return sock


@dataclass
class Frame:
    kind: int
    round: int
    payload: bytes


def _read_exact(sock: ssl.SSLSocket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: ssl.SSLSocket, limits: dict[int, int] | int) -> Frame:
    """One frame; Refused (without reading the payload) when its length header exceeds the limit of its
    kind (`message_limits`; one int: the same limit for every kind)."""
    magic, kind, round_, length = HEADER.unpack(_read_exact(sock, HEADER.size))
    if magic != MAGIC or kind not in KIND_NAMES:
        raise Refused(f"not a Shoal sites frame (magic {magic!r}, kind {kind})")
    limit = limits if isinstance(limits, int) else limits[kind]
    if length > limit:
        raise Refused(f"a {KIND_NAMES[kind]} message of {length} bytes, above the limit of {limit} "
                      f"(its largest legitimate size + 1 MiB); not read")
    return Frame(kind, round_, _read_exact(sock, length))


def write_frame(sock: ssl.SSLSocket, kind: int, round_: int, payload: bytes = b"") -> None:
    sock.sendall(HEADER.pack(MAGIC, kind, round_, len(payload)) + payload)
