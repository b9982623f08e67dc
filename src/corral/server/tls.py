"""TLS for `corral serve`: the operator's certificate, or a local CA made on first start.

`--tls-cert/--tls-key` serve the operator's own certificate. `--tls auto` keeps a small CA in
`<data>/tls/` (made once, kept across restarts) and a server certificate it signs for this
machine's names (`localhost`, its host name and addresses, and any `--tls-name`), remade when
the names change or it nears its end. Clients trust the CA through `CORRAL_CA`, by its path;
the banner prints the path and the CA's SHA-256 fingerprint to compare.

Either way the server speaks TLS 1.3 only. Keys are written 0600, in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.core.errors import InvalidRequest

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate
RENEW_BEFORE = datetime.timedelta(days=30)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS server needs, and what its clients need to trust it."""

    cert: Path
    key: Path
    ca: Path | None = None  # the local CA (`--tls auto` only)

    def fingerprint(self) -> str:
        """SHA-256 of the CA's certificate (or the server's), as AB:CD:… ."""
        pem = (self.ca or self.cert).read_bytes()
        digest = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())
        return ":".join(f"{byte:02X}" for byte in digest)

    def context(self) -> ssl.SSLContext:
        """A server context that speaks TLS 1.3 only."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidRequest(
                f"cannot use the TLS certificate {self.cert} with key {self.key}: {exc}",
                code="invalid_tls",
            ) from exc
        return context


def operator_files(cert: Path | None, key: Path | None) -> TlsFiles | None:
    """The operator's `--tls-cert/--tls-key`, checked: both or neither, both readable."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise InvalidRequest(
            "--tls-cert and --tls-key go together: give both, or use --tls auto",
            code="invalid_tls",
        )
    files = TlsFiles(cert=cert, key=key)
    files.context()  # a missing or mismatched file fails now, not at the first connection
    return files


def auto_files(tls_dir: Path, host: str, extra_names: tuple[str, ...] = ()) -> TlsFiles:
    """The local CA and a server certificate for this machine's names, made as needed."""
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls_dir.chmod(0o700)
    ca_cert, ca_key = tls_dir / "ca.pem", tls_dir / "ca.key"
    if not (ca_cert.exists() and ca_key.exists()):
        _make_ca(ca_cert, ca_key)
    files = TlsFiles(cert=tls_dir / "server.pem", key=tls_dir / "server.key", ca=ca_cert)
    names = machine_names(host, extra_names)
    if not _still_good(files.cert, names):
        _make_server_cert(files, ca_key, names)
    return files


def machine_names(host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The names and addresses clients may use for this server, loopback included."""
    names = [*LOOPBACK_NAMES, *extra]
    if not _is_wildcard(host):
        names.append(host)
    for name in (socket.gethostname(), socket.getfqdn()):
        names.append(name)
        with contextlib.suppress(OSError):  # a host name the resolver does not know
            names += [str(info[4][0]) for info in socket.getaddrinfo(name, None)]
    return tuple(dict.fromkeys(name.split("%")[0] for name in names if name))


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


def plain_http_warning(host: str) -> str | None:
    """What to tell an operator who serves plain HTTP beyond this machine, else None."""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local:
        return None
    return (
        f"serving plain HTTP on {host}: API keys and sandboxes' data cross the network in the "
        "clear; use --tls auto (or --tls-cert/--tls-key)"
    )


def _make_ca(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Corral local CA ({_host()})")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _make_server_cert(files: TlsFiles, ca_key_path: Path, names: tuple[str, ...]) -> None:
    assert files.ca is not None
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(files.key, key)
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))


def _still_good(cert_path: Path, names: tuple[str, ...]) -> bool:
    """Whether the server certificate exists, covers `names` and is not near its end."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    has = {str(value) for value in alt.get_values_for_type(x509.DNSName)}
    has |= {str(value) for value in alt.get_values_for_type(x509.IPAddress)}
    return set(names) <= has and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temp = path.with_name(f".{path.name}.tmp")
    temp.unlink(missing_ok=True)  # a leftover may have other permissions
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    os.replace(temp, path)


def _write_public(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    temp.chmod(0o644)
    os.replace(temp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _host() -> str:
    return socket.gethostname() or "localhost"
