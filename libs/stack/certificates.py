"""Certificates for TLS inside the stack: a private certificate authority, one certificate for
the services and Envoy (server and client, for mutual TLS) and one for command-line clients.

`liveloop up` with `LIVELOOP_STACK_TLS=true` creates them once in `<state_dir>/tls/`;
`liveloop tls create --out DIR --host NAME ...` creates the same set for docker compose or a
cluster, with the host names the services are reached by. Every file is written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs.common.tls import ChannelTls
from libs.stack.processes import write_private
from libs.stack.topology import SERVICES

VALID_DAYS = 825  # the longest validity clients accept for a leaf certificate
CA_VALID_DAYS = 3650
# Names a service is reached by on this machine, in docker compose and in Kubernetes.
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "envoy", *(service.name for service in SERVICES))


@dataclass(frozen=True)
class CertificateFiles:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def service_cert(self) -> Path:
        return self.directory / "service.pem"

    @property
    def service_key(self) -> Path:
        return self.directory / "service-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client-key.pem"

    def client_tls(self) -> ChannelTls:
        """How a client on this machine calls the services: trusting the CA, with the client certificate."""
        return ChannelTls(self.ca, self.client_cert, self.client_key)

    def complete(self) -> bool:
        paths = (self.ca, self.service_cert, self.service_key, self.client_cert, self.client_key)
        return all(path.exists() for path in paths)


def ensure_certificates(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> CertificateFiles:
    """The certificates in `directory`, created when any is missing (all of them again then)."""
    files = CertificateFiles(directory)
    if files.complete():
        return files
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "liveloop certificate authority")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.ca, ca.public_bytes(serialization.Encoding.PEM))
    service_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    _leaf(files.service_cert, files.service_key, "liveloop services", hosts, service_usages, ca, ca_key, now)
    client_usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    _leaf(files.client_cert, files.client_key, "liveloop client", (), client_usages, ca, ca_key, now)
    return files


def _leaf(
    cert_path: Path,
    key_path: Path,
    common_name: str,
    hosts: tuple[str, ...],
    usages: list[x509.ObjectIdentifier],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
        )
    certificate = builder.sign(ca_key, hashes.SHA256())
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
