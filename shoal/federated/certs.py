"""Certificates for mutual TLS: a private CA, a server certificate, one per client, and a CRL.

`shoal fed certs` writes everything into one folder; the server trusts only that CA and checks
each caller's serial number against `crl.pem`, so revoking a site is `shoal fed certs --revoke NAME`.
A client's identity is the common name (CN) of its certificate, never a name it claims.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.config import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VALID_DAYS = 365


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)  # private keys readable by their owner only


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not (folder / "ca.pem").is_file() or not (folder / "ca.key").is_file():
        raise ConfigError(f"{folder}: no ca.pem/ca.key; run `shoal fed certs --out {folder}` first")
    cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def make_ca(folder: Path, name: str = "Shoal federation CA") -> None:
    """A self-signed CA that signs the server's and every client's certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    _write_key(folder / "ca.key", key)
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_crl(folder, [])


def issue(folder: Path, name: str, *, server: bool = False, hosts: tuple[str, ...] = ()) -> Path:
    """Sign a certificate for `name` (a client site, or 'server' with its host names)."""
    if not NAME_RE.match(name):
        raise ConfigError(f"certificate name '{name}' must be letters, digits, '.', '_' or '-'")
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() - datetime.timedelta(minutes=5))
               .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        alt: list[x509.GeneralName] = []
        for host in hosts or ("localhost", "127.0.0.1"):
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(folder / f"{name}.key", key)
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_crl(folder: Path, serials: list[int]) -> None:
    """(Re)write crl.pem, signed by the CA, listing the revoked serial numbers."""
    ca_cert, ca_key = _load_ca(folder)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(_now()).next_update(_now() + datetime.timedelta(days=VALID_DAYS)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now()).build())
    (folder / "crl.pem").write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def revoke(folder: Path, name: str) -> int:
    """Add `name`'s certificate to the CRL; returns its serial number."""
    path = folder / f"{name}.pem"
    if not path.is_file():
        raise ConfigError(f"no certificate {path} to revoke")
    serial = x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    write_crl(folder, sorted(set(revoked_serials(folder)) | {serial}))
    return serial


def revoked_serials(folder: Path) -> set[int]:
    """Serials listed in crl.pem, after checking the CA's signature on it."""
    path = folder / "crl.pem"
    if not path.is_file():
        return set()
    crl = x509.load_pem_x509_crl(path.read_bytes())
    ca_cert, _ = _load_ca(folder) if (folder / "ca.key").is_file() else (
        x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes()), None)
    if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise ConfigError(f"{path}: not signed by this federation's CA")
    return {entry.serial_number for entry in crl}


def make_all(folder: Path, clients: list[str], hosts: tuple[str, ...] = ()) -> list[Path]:
    """CA (kept if present), server certificate and one certificate per client."""
    if not (folder / "ca.key").is_file():
        make_ca(folder)
    written = [folder / "ca.pem", issue(folder, "server", server=True, hosts=hosts)]
    for name in clients:
        if name == "server":
            raise ConfigError("'server' is reserved for the server's certificate")
        written.append(issue(folder, name))
    return written
