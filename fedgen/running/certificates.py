"""Certificates and node keys for a test federation, written with `cryptography` (a flwr dependency).

    <dir>/ca.crt, ca.key           a certificate authority (keep ca.key off the network)
    <dir>/server.pem, server.key   the SuperLink's TLS certificate, with every host name and IP
                                   the SuperNodes will dial in its subjectAltName
    <dir>/node-N, node-N.pub       SuperNode N's authentication key pair (EC P-384, OpenSSH format):
                                   the private key stays at the hospital, the .pub is registered
                                   at the SuperLink with `flwr supernode register`

Good for a test or pilot federation. A production deployment uses the institution's PKI for the
server certificate; the node keys are generated at each hospital and only the .pub travels.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class CertificateFiles:
    root: Path

    ca = property(lambda self: self.root / "ca.crt")
    ca_key = property(lambda self: self.root / "ca.key")
    server_cert = property(lambda self: self.root / "server.pem")
    server_key = property(lambda self: self.root / "server.key")

    def node_key(self, node: int) -> Path:
        return self.root / f"node-{node}"

    def node_public_key(self, node: int) -> Path:
        return self.root / f"node-{node}.pub"


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgen test federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(files: CertificateFiles, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedgen test CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    files.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.ca_key, _pem_key(key))
    return cert, key


def make_server_certificate(
    files: CertificateFiles, hosts: list[str], ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(key))


def make_node_key(files: CertificateFiles, node: int) -> None:
    """An EC P-384 key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` writes it."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        files.node_key(node),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                          serialization.NoEncryption()),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files.node_public_key(node).write_bytes(public + f" fedgen-node-{node}\n".encode())


def make_certificates(root: str | Path, num_nodes: int, hosts: list[str] | None = None) -> CertificateFiles:
    """Write a CA, a SuperLink certificate valid for `hosts` (plus loopback) and `num_nodes`
    SuperNode key pairs into `root`. Refuses to overwrite an existing CA."""
    files = CertificateFiles(Path(root))
    if files.ca.exists():
        raise FileExistsError(f"{files.ca} exists: refusing to replace a CA (pick another directory)")
    files.root.mkdir(parents=True, exist_ok=True)
    all_hosts = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    now = datetime.datetime.now(datetime.timezone.utc)
    ca, ca_key = make_ca(files, now)
    make_server_certificate(files, all_hosts, ca, ca_key, now)
    for node in range(num_nodes):
        make_node_key(files, node)
    return files
