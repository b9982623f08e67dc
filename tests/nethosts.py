"""Test hosts for egress policy: a network namespace the tests make, with servers in it, and a
DNS server for their names. Nothing leaves the machine.

    198.51.100.1    the host's end of the veth; the test DNS server listens here
    198.51.100.10   a web server (HTTP 80, TLS 443) that answers for two names, web.test and
                    alias.test, saying which name and which of its addresses it was reached by
    198.51.100.20   the same web server, plus a raw TCP service on 7000 and UDP echo on 7001

Names: web.test and alias.test -> .10; raw.test -> .20; private.test -> 10.1.2.3 (a name that
points into the host's network); meta.test -> 169.254.169.254.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

NETNS = "corral-testnet"
HOST_IFACE = "crtnet0"
HOST_SIDE = "198.51.100.1"
WEB = "198.51.100.10"
RAW = "198.51.100.20"
NAMES = {
    "web.test.": WEB,
    "alias.test.": WEB,
    "raw.test.": RAW,
    "private.test.": "10.1.2.3",
    "meta.test.": "169.254.169.254",
}

# Run inside a sandbox: python3 probe.py '[["http", address, host], ...]' prints each call's
# outcome, {"ok": value} or {"error", "errno", "text"}, with the seconds it took.
PROBE = r"""
import json, select, socket, ssl, sys, time

def outcome(fn):
    start = time.monotonic()
    try:
        value = fn()
        result = {"ok": value}
    except OSError as exc:
        result = {"error": type(exc).__name__, "errno": exc.errno, "text": str(exc)}
    result["seconds"] = round(time.monotonic() - start, 2)
    return result

def resolve(name):
    return socket.gethostbyname(name)

def http(address, host, port=80):
    with socket.create_connection((address, port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.split(b"\r\n\r\n", 1)[-1].decode().strip()

def https(address, name):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((address, 443), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data.split(b"\r\n\r\n", 1)[-1].decode().strip()

def tcp(address, port):
    with socket.create_connection((address, int(port)), timeout=10) as s:
        return s.recv(100).decode().strip()

def udp(address, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((address, int(port)))
        s.send(b"hi")
        return s.recv(100).decode()

def dns(server, name):
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query, (server, 53))
        answer = s.recv(512)
        return {"rcode": answer[3] & 15, "answers": int.from_bytes(answer[6:8], "big")}

def hold(address, port, count):
    held, reset = [], 0
    for _ in range(int(count)):
        try:
            held.append(socket.create_connection((address, int(port)), timeout=10))
        except (ConnectionResetError, ConnectionRefusedError):  # refused before connect() returned
            reset += 1
    time.sleep(1)
    readable, _, _ = select.select(held, [], [], 0.5)  # reset ones are readable; held ones not
    for s in readable:
        try:
            s.recv(1)
        except ConnectionResetError:
            reset += 1
    return {"held": len(held) - len(readable), "reset": reset}

calls = json.loads(sys.argv[1])
print(json.dumps([outcome(lambda c=c: globals()[c[0]](*c[1:])) for c in calls]))
"""

SERVERS = r"""
import asyncio, ssl, sys

async def web(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    host = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                 if line.lower().startswith(b"host:")), b"?")
    here = writer.get_extra_info("sockname")[0].encode()
    body = b"host=" + host + b" at=" + here + b"\n"
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()
    writer.close()

async def raw(reader, writer):
    writer.write(b"raw service\n")
    await writer.drain()
    writer.close()

class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        self.transport.sendto(b"echo " + data, addr)

async def main():
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[1], sys.argv[2])
    servers = [
        await asyncio.start_server(web, "0.0.0.0", 80),
        await asyncio.start_server(web, "0.0.0.0", 443, ssl=context),
        await asyncio.start_server(raw, sys.argv[3], 7000),
    ]
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Echo, local_addr=(sys.argv[3], 7001))
    print("ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))

asyncio.run(main())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=web.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class Resolver:
    """The test DNS server: answers the test names, NXDOMAIN for the rest; counts questions."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((HOST_SIDE, 53))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.2)  # so that `close` is noticed: a blocked recv keeps the port
        self.asked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower()
            self.asked.append(name)
            if name not in NAMES:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", NAMES[name]))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def teardown() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    subprocess.run(["ip", "link", "del", HOST_IFACE], capture_output=True, check=False)


def test_network(folder: Path) -> Iterator[Resolver]:
    """Make the test hosts and their resolver; yield the resolver; take them down."""
    teardown()
    _ip("netns", "add", NETNS)
    _ip("link", "add", HOST_IFACE, "type", "veth", "peer", "name", "eth0", "netns", NETNS)
    _ip("addr", "add", f"{HOST_SIDE}/24", "dev", HOST_IFACE)
    _ip("link", "set", HOST_IFACE, "up")
    for address in (WEB, RAW):
        _ip("-n", NETNS, "addr", "add", f"{address}/24", "dev", "eth0")
    _ip("-n", NETNS, "link", "set", "eth0", "up")
    _ip("-n", NETNS, "link", "set", "lo", "up")
    _ip("-n", NETNS, "route", "add", "default", "via", HOST_SIDE)
    # Replies to sandboxes' forwarded traffic come in here.
    Path(f"/proc/sys/net/ipv4/conf/{HOST_IFACE}/forwarding").write_text("1\n")
    cert, key = _certificate(folder)
    servers = subprocess.Popen(
        ["ip", "netns", "exec", NETNS, sys.executable, "-c", SERVERS, str(cert), str(key), RAW],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    resolver = None
    try:
        assert servers.stdout is not None
        line = servers.stdout.readline()
        assert line.strip() == b"ready", line + servers.stdout.read()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the veth needs a moment before it carries
            try:
                socket.create_connection((RAW, 7000), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        resolver = Resolver()
        yield resolver
    finally:
        if resolver is not None:
            resolver.close()
        servers.kill()
        servers.wait()
        assert servers.stdout is not None
        servers.stdout.close()
        teardown()
