"""The server's TLS files: a local CA kept across restarts, certificates for this machine's
names, the operator's own files checked, and a warning for plain HTTP beyond loopback."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from corral.client._transport import tls_context
from corral.core.errors import InvalidRequest
from corral.server import tls


def names_in(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(value) for value in alt.get_values_for_type(x509.DNSName)} | {
        str(value) for value in alt.get_values_for_type(x509.IPAddress)
    }


def test_auto_makes_a_ca_once_and_a_certificate_for_the_machine(tmp_path: Path) -> None:
    files = tls.auto_files(tmp_path / "tls", "0.0.0.0")
    assert files.ca is not None
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    for key in (files.key, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    names = names_in(files.cert)
    assert {"localhost", "127.0.0.1", "::1"} <= names
    assert "0.0.0.0" not in names
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    x509.load_pem_x509_certificate(files.cert.read_bytes()).verify_directly_issued_by(ca)
    fingerprint = files.fingerprint()
    assert len(fingerprint.split(":")) == 32

    # A restart keeps both; a new name remakes the server certificate under the same CA.
    cert_bytes = files.cert.read_bytes()
    again = tls.auto_files(tmp_path / "tls", "0.0.0.0")
    assert again.fingerprint() == fingerprint
    assert again.cert.read_bytes() == cert_bytes
    named = tls.auto_files(tmp_path / "tls", "10.1.2.3", ("corral.example",))
    assert named.fingerprint() == fingerprint
    assert {"10.1.2.3", "corral.example"} <= names_in(named.cert)
    ipaddress.ip_address("10.1.2.3")  # stored as an address, not a DNS name
    assert named.context().minimum_version is ssl.TLSVersion.TLSv1_3


def test_operator_files_are_checked_before_serving(tmp_path: Path) -> None:
    made = tls.auto_files(tmp_path / "tls", "127.0.0.1")
    assert tls.operator_files(None, None) is None
    given = tls.operator_files(made.cert, made.key)
    assert given is not None and given.ca is None
    with pytest.raises(InvalidRequest) as half:
        tls.operator_files(made.cert, None)
    assert half.value.code == "invalid_tls"
    with pytest.raises(InvalidRequest) as missing:
        tls.operator_files(tmp_path / "nope.pem", made.key)
    assert missing.value.code == "invalid_tls"
    other = tls.auto_files(tmp_path / "other", "127.0.0.1")
    with pytest.raises(InvalidRequest) as mismatched:
        tls.operator_files(made.cert, other.key)
    assert mismatched.value.code == "invalid_tls"


@pytest.mark.parametrize(
    ("host", "warned"),
    [
        ("127.0.0.1", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("10.0.0.5", True),
        ("corral.example", True),
    ],
)
def test_plain_http_beyond_loopback_is_warned_about(host: str, warned: bool) -> None:
    warning = tls.plain_http_warning(host)
    assert (warning is not None) == warned
    if warning:
        assert "--tls auto" in warning


def test_the_client_refuses_a_ca_it_cannot_read(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate")
    for path in (junk, tmp_path / "missing.pem"):
        with pytest.raises(InvalidRequest) as refused:
            tls_context(str(path), verify=True)
        assert refused.value.code == "invalid_tls"
        assert "CORRAL_CA" in refused.value.message
    assert tls_context(None, verify=False).verify_mode is ssl.CERT_NONE


def test_the_banner_prints_the_fingerprint_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`:AB:` in a fingerprint is rich's emoji code for 🆎; a CI run once printed that."""
    from corral.cli._local import _banner

    files = tls.auto_files(tmp_path / "[/tls]", "127.0.0.1")
    fingerprint = "6A:AB:DE:74:CL:ID:" + files.fingerprint()
    monkeypatch.setattr(tls.TlsFiles, "fingerprint", lambda _self: fingerprint)
    _banner("127.0.0.1", 8000, ("env", None), files)
    banner = capsys.readouterr().err
    assert fingerprint in banner.replace("\n", "")
    assert f"CORRAL_CA={files.ca}" in banner


def test_an_error_message_is_printed_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from corral.cli._common import fail

    with pytest.raises(typer.Exit):
        fail(InvalidRequest("no such file [/etc/x] :ab:", code="invalid_path"))
    assert "error (invalid_path): no such file [/etc/x] :ab:" in capsys.readouterr().err
