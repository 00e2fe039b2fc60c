"""A small certificate authority for the control plane: the lab's and the deploy's.

`CertificateAuthority(dir)` keeps `ca.pem` (given to every client) and `ca.key`
(0600, in a 0700 directory; it never leaves that directory) and issues server
certificates for a list of names and addresses. The lab makes a throwaway one per
lab; the deploy keeps the fleet's on the operator's controller (WGJIT_CA_DIR).

EC P-256 keys: they are what every TLS stack verifies, and signing one takes
well under a millisecond, so a lab start does not wait on RSA key generation.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.secrets import SecretFileError, check_private, write_secret

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate, so no tool balks
RENEW_DAYS = 30  # a certificate this close to its end is issued again


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def subject_alt_names(names: list[str]) -> list[x509.GeneralName]:
    """IP addresses as IP entries (what clients match an IP URL against), the rest as DNS."""
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip("[]") for n in names if n):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def cert_names(cert: x509.Certificate) -> list[str]:
    """The names and addresses a certificate is valid for, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]


class CertificateAuthority:
    """A CA in a directory: made on first use, loaded after that."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "wgjit CA") -> None:
        self.dir = Path(directory)
        self.cert_file = self.dir / CA_CERT
        self.key_file = self.dir / CA_KEY
        if not self.key_file.exists():
            self._create(name)
        check_private(self.key_file, what="CA key")
        self.key = serialization.load_pem_private_key(self.key_file.read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())

    def _create(self, name: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        # The key first: a directory with a certificate and no key is a half-made CA.
        write_secret(self.key_file, _key_pem(key))
        self.cert_file.write_text(cert.public_bytes(serialization.Encoding.PEM).decode())

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue_server(self, names: list[str],
                     days: int = SERVER_DAYS) -> tuple[str, str]:
        """A new key and a certificate for `names` (host names and IP addresses): PEM texts."""
        sans = subject_alt_names(names)
        if not sans:
            raise ValueError("a server certificate needs at least one name or address")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                            names[0].strip("[]"))]))
                .issuer_name(self.cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)

    def server_files(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                     names: list[str]) -> bool:
        """Keep a server certificate at cert_file/key_file (0600) valid for exactly `names`.

        Issued again only when missing, made by another CA, for other names, or
        within RENEW_DAYS of its end, so a repeated deploy changes nothing.
        Returns True when it issued a new one.
        """
        cert_path, key_path = Path(cert_file), Path(key_file)
        if cert_path.exists() and key_path.exists():
            try:
                check_private(key_path, what="server key")
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (SecretFileError, ValueError):
                cert = None
            if cert is not None and cert.issuer == self.cert.subject \
                    and self._signed_by_me(cert) \
                    and sorted(cert_names(cert)) == sorted(_canonical(names)) \
                    and cert.not_valid_after_utc - _now() > datetime.timedelta(days=RENEW_DAYS):
                return False
        cert_pem, key_pem = self.issue_server(names)
        write_secret(key_path, key_pem)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_text(cert_pem)
        return True

    def _signed_by_me(self, cert: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(self.cert)
        except Exception:  # InvalidSignature, or a key type it cannot check
            return False
        return True


def _canonical(names: list[str]) -> list[str]:
    """`names` as cert_names() reports them back (IPs normalised, duplicates gone)."""
    return [str(getattr(g, "value", g)) for g in subject_alt_names(names)]
