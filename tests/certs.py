"""Certificates for the TLS tests, made with ``cryptography``: a CA, a server certificate for
localhost and 127.0.0.1, a client certificate (CN alice) and one that another CA signed."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_cert(cn: str, subject_key: Any, issuer_cn: str, issuer_key: Any, *, ca: bool = False,
             server: bool = False, email: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    elif email is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def key_pem(private_key: Any) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def write_pem(path: Path, certificate: x509.Certificate, private_key: Any) -> tuple[Path, Path]:
    cpath, kpath = path.with_suffix(".crt"), path.with_suffix(".key")
    cpath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    kpath.write_bytes(key_pem(private_key))
    return cpath, kpath


def make_pki(d: Path) -> dict[str, Path]:
    ca_key = new_key()
    ca_crt, _ = write_pem(d / "ca", new_cert("test CA", ca_key, "test CA", ca_key, ca=True), ca_key)
    srv_key = new_key()
    srv_crt, srv_key_path = write_pem(d / "server", new_cert("localhost", srv_key, "test CA", ca_key, server=True),
                                      srv_key)
    cli_key = new_key()
    cli_crt, cli_key_path = write_pem(d / "alice", new_cert("alice", cli_key, "test CA", ca_key), cli_key)
    san_key = new_key()
    san_crt, san_key_path = write_pem(d / "carol", new_cert("not-carol", san_key, "test CA", ca_key,
                                                            email="carol@example.com"), san_key)
    rogue_key = new_key()
    rogue_crt, rogue_key_path = write_pem(d / "rogue", new_cert("alice", rogue_key, "rogue", rogue_key), rogue_key)
    return {"ca": ca_crt, "crt": srv_crt, "key": srv_key_path, "cli_crt": cli_crt, "cli_key": cli_key_path,
            "rogue_crt": rogue_crt, "rogue_key": rogue_key_path, "san_crt": san_crt, "san_key": san_key_path}
