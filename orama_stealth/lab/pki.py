"""A throwaway certificate authority for the lab node and the tests.

Certificates are ECDSA P-256, like the ones Caddy obtains from Let's Encrypt, so TLS costs in
the lab resemble production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class IssuedCert:
    cert_file: Path
    key_file: Path
    names: tuple[str, ...]


class TestCA:
    """A CA whose key lives in memory; `issue` writes PEM leaf certificates to disk."""

    __test__ = False  # not a pytest test class

    def __init__(self, common_name: str = "orama-stealth test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> TestCA:
        """A CA saved earlier with `write_ca` + `write_key`, so it can issue again."""
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"{cert_file}: not a readable PEM CA certificate: {e}") from e
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{key_file}: not a readable unencrypted PEM key: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: expected an EC private key, got {type(key).__name__}")
        pub = cert.public_key()
        if (
            not isinstance(pub, ec.EllipticCurvePublicKey)
            or pub.public_numbers() != key.public_key().public_numbers()
        ):
            raise ValueError(f"{key_file}: key does not match the certificate in {cert_file}")
        ca = cls.__new__(cls)
        ca._key = key
        ca.cert = cert
        return ca

    def write_key(self, path: Path) -> Path:
        """The CA's private key, unencrypted PEM, mode 0600."""
        path.write_bytes(b"")
        path.chmod(0o600)
        path.write_bytes(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def issue(
        self, names: list[str] | tuple[str, ...], directory: Path, stem: str,
        days: int = 90, key_mode: int = 0o600,
    ) -> IssuedCert:
        """Issue a server certificate for DNS names and/or IP addresses."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        cert_file = directory / f"{stem}.crt"
        key_file = directory / f"{stem}.key"
        # Full chain in the cert file, as Caddy and coturn expect.
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(key_mode)
        return IssuedCert(cert_file, key_file, tuple(names))
