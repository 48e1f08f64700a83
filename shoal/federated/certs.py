"""Certificates for mutual TLS: a private CA, a server certificate, one per client, and a CRL.

`shoal fed certs` writes everything into one folder; the server trusts only that CA and checks
each caller's serial number against `crl.pem`, so revoking a site is `shoal fed certs --revoke NAME`.
A client's identity is the common name (CN) of its certificate, never a name it claims.

Every certificate signed is recorded in `issued.json` (name, serial, expiry), so revoking a name
revokes every certificate ever issued to it, not only the one on disk now. Running the command
again keeps the certificates that exist; `--reissue NAMES` replaces those and revokes their old ones.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.config import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VALID_DAYS = 365
RECORD = "issued.json"


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


def issue(folder: Path, name: str, *, server: bool = False, hosts: tuple[str, ...] = (), peer: bool = False) -> Path:
    """Sign a certificate for `name` (a client site, or 'server' with its host names). `peer`: one
    certificate that both serves and calls (a training site of shoal/sites, listener and dialer at once)."""
    if not NAME_RE.match(name):
        raise ConfigError(f"certificate name '{name}' must be letters, digits, '.', '_' or '-'")
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if peer else
              [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH])
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() - datetime.timedelta(minutes=5))
               .not_valid_after(_now() + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if server or peer:
        alt: list[x509.GeneralName] = []
        for host in hosts or ("localhost", "127.0.0.1"):
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _record(folder, name, cert)  # before the files: a certificate that exists is always on record
    _write_key(folder / f"{name}.key", key)
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (a running server) see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def issued(folder: Path) -> list[dict[str, str]]:
    """The issuance record: one {name, serial (hex), not_after} per certificate ever signed here."""
    path = folder / RECORD
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["certificates"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: not a Shoal issuance record") from None


def _record(folder: Path, name: str, cert: x509.Certificate) -> None:
    entries = issued(folder) + [{"name": name, "serial": f"{cert.serial_number:x}",
                                 "not_after": cert.not_valid_after_utc.isoformat()}]
    _write_atomic(folder / RECORD, (json.dumps({"certificates": entries}, indent=1) + "\n").encode())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's sequence number (RFC 5280, 5.2.3); -1 for a CRL written without one."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return -1


def write_crl(folder: Path, serials: list[int]) -> None:
    """(Re)write crl.pem, signed by the CA, listing the revoked serial numbers. Each CRL carries a
    number one above the previous one's, so a server can refuse an older CRL put back (a rollback)."""
    ca_cert, ca_key = _load_ca(folder)
    previous = -1
    if (folder / "crl.pem").is_file():
        try:
            previous = crl_number(x509.load_pem_x509_crl((folder / "crl.pem").read_bytes()))
        except ValueError:
            previous = -1
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(_now()).next_update(_now() + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.CRLNumber(previous + 1), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now()).build())
    _write_atomic(folder / "crl.pem", builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def serials_of(folder: Path, name: str) -> set[int]:
    """Every serial issued to `name`: the record's, and the certificate on disk (made before records were kept)."""
    serials = {int(entry["serial"], 16) for entry in issued(folder) if entry["name"] == name}
    path = folder / f"{name}.pem"
    if path.is_file():
        serials.add(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)
    return serials


def revoke(folder: Path, name: str) -> list[int]:
    """Add every certificate ever issued to `name` to the CRL; returns their serial numbers."""
    serials = serials_of(folder, name)
    if not serials:
        raise ConfigError(f"no certificate was issued to '{name}' in {folder} (none in {RECORD}, no {name}.pem)")
    write_crl(folder, sorted(revoked_serials(folder) | serials))
    return sorted(serials)


def load_crl(folder: Path) -> x509.CertificateRevocationList:
    """crl.pem, checked: signed by the federation's CA and not past its next update. ConfigError otherwise."""
    path = folder / "crl.pem"
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        ca_cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read: {err}") from None
    if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise ConfigError(f"{path}: not signed by this federation's CA")
    if crl.next_update_utc is not None and crl.next_update_utc < _now():
        raise ConfigError(f"{path} expired on {crl.next_update_utc:%Y-%m-%d}; run `shoal fed certs --revoke` or "
                          f"re-sign it")
    return crl


def client_certificate_refusal(cert: x509.Certificate) -> str:
    """Why `cert` may not identify a client ('' when it may): it must be a leaf (CA:FALSE) issued for
    client authentication, so neither the CA's own certificate nor the server's can pose as a site."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "it is a CA certificate (basicConstraints CA:TRUE); a client certificate must be a leaf"
    except x509.ExtensionNotFound:
        return "it has no basicConstraints extension; a client certificate must say CA:FALSE"
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "it has no extendedKeyUsage; a client certificate must allow clientAuth"
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "its extendedKeyUsage does not include clientAuth"
    return ""


def revoked_serials(folder: Path) -> set[int]:
    """Serials listed in crl.pem (empty when there is none), after checking it."""
    if not (folder / "crl.pem").is_file():
        return set()
    return {entry.serial_number for entry in load_crl(folder)}


def make_all(folder: Path, clients: list[str], hosts: tuple[str, ...] = (),
             reissue: tuple[str, ...] = ()) -> list[tuple[Path, str]]:
    """CA (kept if present), server certificate and one per client; returns (file, what happened) pairs.

    A name that already has a certificate keeps it. A name in `reissue` ('server' included) gets
    a new one and every earlier certificate of that name is revoked, so a copy of an old key
    stops working.
    """
    for name in clients:
        if name == "server":
            raise ConfigError("'server' is reserved for the server's certificate")
    names = ["server"] + clients + [n for n in reissue if n != "server" and n not in clients]
    if not (folder / "ca.key").is_file():
        make_ca(folder)
    done = [(folder / "ca.pem", "CA")]
    for name in names:
        path = folder / f"{name}.pem"
        if path.is_file() and name not in reissue:
            done.append((path, f"kept (already issued; --reissue {name} replaces it)"))
            continue
        old = serials_of(folder, name)
        issue(folder, name, server=name == "server", hosts=hosts)
        if old:
            write_crl(folder, sorted(revoked_serials(folder) | old))
            done.append((path, f"re-issued; {len(old)} earlier certificate(s) of '{name}' revoked in crl.pem"))
        else:
            done.append((path, "issued"))
    return done
