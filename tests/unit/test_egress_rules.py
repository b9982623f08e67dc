"""Egress rules: parsing, every refusal of bad input, the decision, and the names read from a
connection's first bytes (TLS SNI, HTTP Host)."""

from __future__ import annotations

import ipaddress
import ssl

import pytest

from corral import Network
from corral.core.egress import EgressPolicy, Rule, decide
from corral.core.errors import InvalidRequest
from corral.core.spec import SandboxSpec
from corral.engine.egress import _allowed_blocks
from corral.engine.egress.guard import LEARNED_KEPT, Sandbox
from corral.engine.egress.resolver import _host_side
from corral.engine.egress.sniff import NeedMore, name_of


def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def test_rules_parse_names_wildcards_and_blocks() -> None:
    assert Rule.parse("API.Example.com.").name == "api.example.com"
    wildcard = Rule.parse("*.example.org")
    assert wildcard.wildcard and wildcard.matches_name("a.b.example.org")
    assert not wildcard.matches_name("example.org")  # the apex is not below itself
    assert not wildcard.matches_name("badexample.org")
    assert Rule.parse("203.0.113.7").text == "203.0.113.7/32"
    assert Rule.parse("203.0.113.9/24").text == "203.0.113.0/24"


@pytest.mark.parametrize(
    "bad",
    ["", " ", "*", "*.", "foo.*.com", "exa mple.com", "a..b", "-a.com", "1.2.3", "2001:db8::/32",
     "x" * 64 + ".com", 7, None, "http://example.com", "example.com:443"],
)  # fmt: skip
def test_bad_rules_are_refused_saying_what_to_give(bad: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Rule.parse(bad)
    assert caught.value.code == "invalid_network_rule"
    assert "example" in caught.value.message or "IPv4" in caught.value.message


def test_bad_policies_are_refused() -> None:
    for bad in ("pypi.org", ["pypi.org"], {"allow": "pypi.org"}, {"allow": [], "other": []},
                {"deny": ["x.com"] * 257}):  # fmt: skip
        with pytest.raises(InvalidRequest) as caught:
            EgressPolicy.parse(bad)
        assert caught.value.code == "invalid_network_rule"
    with pytest.raises(InvalidRequest, match="network='internet'"):
        SandboxSpec(egress={"allow": ["pypi.org"]})
    with pytest.raises(InvalidRequest):
        Network(allow=["not a rule"])  # the SDK checks before it sends


def test_decisions() -> None:
    own = EgressPolicy.parse({"allow": ["api.example.com", "*.cdn.test", "198.51.100.0/24"],
                              "deny": ["bad.cdn.test", "198.51.100.66"]})  # fmt: skip
    floor = EgressPolicy.parse({"deny": ["*.corp.test"]})
    public = ip("198.51.100.5")
    assert decide(own, floor, ["api.example.com"], None) is None
    assert decide(own, floor, ["x.cdn.test"], ip("203.0.113.5")) is None
    assert decide(own, floor, [], public) is None  # by block
    denied = decide(own, floor, ["bad.cdn.test"], public)
    assert denied is not None and denied.rule == "deny bad.cdn.test" and denied.definite
    other = decide(own, floor, ["other.test"], None)
    assert other is not None and not other.definite  # an address may still be allowed
    dialled = decide(own, floor, [], ip("198.51.100.66"))
    assert dialled is not None and dialled.rule == "deny 198.51.100.66/32"
    corp = decide(EgressPolicy(), floor, ["git.corp.test"], public)
    assert corp is not None and corp.rule == "operator deny *.corp.test"
    for always in ("169.254.169.254", "168.63.129.16", "10.0.0.1", "127.0.0.1", "100.96.0.2"):
        refused = decide(EgressPolicy(), EgressPolicy(), ["api.example.com"], ip(always))
        assert refused is not None and refused.rule.startswith("always denied"), always
    assert EgressPolicy.parse({"allow": None, "deny": []}).restricts is False


def test_the_kernel_gets_the_blocks_both_policies_allow() -> None:
    floor = EgressPolicy.parse({"allow": ["198.51.100.0/24", "pypi.org"]})
    own = EgressPolicy.parse({"allow": ["198.51.100.16/28", "203.0.113.0/24"]})
    assert _allowed_blocks(floor, own) == ("198.51.100.16/28",)
    assert _allowed_blocks(EgressPolicy(), own) == ("198.51.100.16/28", "203.0.113.0/24")
    assert _allowed_blocks(EgressPolicy(), EgressPolicy()) is None
    assert _allowed_blocks(EgressPolicy.parse({"allow": ["pypi.org"]}), EgressPolicy()) == ()


def client_hello(name: str | None) -> bytes:
    """A real ClientHello from Python's TLS stack."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_names_come_from_sni_and_host() -> None:
    hello = client_hello("Web.Test")
    assert name_of(hello) == "web.test"
    for cut in (1, 5, 40, len(hello) - 1):
        with pytest.raises(NeedMore):
            name_of(hello[:cut])
    assert name_of(client_hello(None)) is None
    assert name_of(b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n") == "example.com"
    assert name_of(b"GET / HTTP/1.1\r\nHost: 198.51.100.7\r\n\r\n") is None  # an address
    assert name_of(b"GET / HTTP/1.1\r\nX: y\r\n\r\n") is None
    for partial in (b"", b"GE", b"GET /index.html HTTP/1.1\r\nHo"):
        with pytest.raises(NeedMore):
            name_of(partial)
    assert name_of(b"SSH-2.0-OpenSSH_9\r\n") is None
    assert name_of(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None  # not a ClientHello
    assert name_of(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff") is None  # garbage


def test_odd_names_and_hellos_give_no_name() -> None:
    assert name_of(b"GET / HTTP/1.1\r\nHost: evi\xadl.com\r\n\r\n") is None  # not plain ASCII
    assert name_of(b"GET / HTTP/1.1\r\nHost: xn--e1afmkfd.com\r\n\r\n") == "xn--e1afmkfd.com"
    hello = client_hello("web.test")
    # The same ClientHello cut into one-byte TLS records: real clients never do, so no name.
    body = hello[5:]
    records = b"".join(b"\x16\x03\x01\x00\x01" + body[i : i + 1] for i in range(len(body)))
    assert name_of(records) is None


def test_questions_about_the_hosts_network_are_refused() -> None:
    for name in ("localhost", "printer.local", "metadata.google.internal", "router.lan",
                 "5.2.0.10.in-addr.arpa", "16.172.in-addr.arpa", "1.0.0.127.in-addr.arpa"):  # fmt: skip
        assert _host_side(name) is not None, name
    for name in ("pypi.org", "8.8.8.8.in-addr.arpa", "web.test"):
        assert _host_side(name) is None, name


def test_learned_names_are_bounded() -> None:
    sandbox = Sandbox("sb-x", EgressPolicy())
    for n in range(LEARNED_KEPT + 10):
        sandbox.learn(ipaddress.IPv4Address(0x0A000000 + n), f"n{n}.test", 60)
    assert len(sandbox.learned) == LEARNED_KEPT
    assert sandbox.names_of(ipaddress.IPv4Address(0x0A000000 + LEARNED_KEPT + 9)) == [
        f"n{LEARNED_KEPT + 9}.test"
    ]
