"""Lifecycle webhooks: the operator's gets every key's events, a key's its own; deliveries are
signed and timestamped, retried with backoff, and never hold the engine up; a key's URL that
points at the host's network is refused. The receiver is a server on loopback in this process."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import corral
from corral import Client, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, free_port, start_server

OPERATOR_SECRET = "whsec_operator_" + "x" * 24


class Receiver(http.server.ThreadingHTTPServer):
    """Records each delivery by path; `/flaky` fails its first two, `/slow` never answers."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes, float]] = []
        self.failures = {"/flaky": 2}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _Handler)

    def at(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {"headers": headers, "body": json.loads(body), "raw": body, "when": when}
                for where, headers, body, when in self.got
                if where == path
            ]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.got.append((self.path, dict(self.headers), body, time.monotonic()))
            left = self.server.failures.get(self.path, 0)
            self.server.failures[self.path] = max(0, left - 1)
        if self.path == "/slow":
            time.sleep(30)
        self.send_response(500 if left else 204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def verified(secret: str, delivery: dict[str, Any]) -> bool:
    """Whether the delivery's Corral-Signature is right for its body, and fresh."""
    fields = dict(part.split("=", 1) for part in delivery["headers"]["Corral-Signature"].split(","))
    signed = f"{fields['t']}.".encode() + delivery["raw"]
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 120


def until(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "it never happened"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    threading.Thread(target=made.serve_forever, daemon=True).start()
    yield made
    made.shutdown()
    made.server_close()


@pytest.fixture(scope="module")
def server(data_dir: Path, receiver: Receiver) -> Iterator[Server]:
    require_runtime("namespaces")
    port = receiver.server_address[1]
    running = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-webhooks"), data_dir / "images",
        "--webhook", f"http://127.0.0.1:{port}/operator",
        env={"CORRAL_WEBHOOK_SECRET": OPERATOR_SECRET},
    )  # fmt: skip
    yield running
    running.stop_and_clean()


def states(deliveries: list[dict[str, Any]], sandbox_id: str) -> list[str]:
    return [
        d["body"]["data"]["state"]
        for d in deliveries
        if d["body"]["type"] == "sandbox.state" and d["body"]["data"]["sandbox_id"] == sandbox_id
    ]


def test_keys_and_the_operator_get_signed_events_retried_in_order(
    server: Server, receiver: Receiver
) -> None:
    port = receiver.server_address[1]
    tenant, other = server.new_key("hooked"), server.new_key("not-hooked")
    with corral.Client(url=server.url, api_key=tenant) as mine, \
            corral.Client(url=server.url, api_key=other) as theirs:  # fmt: skip
        hook = mine.create_webhook(f"http://localhost:{port}/flaky", events=["sandbox.state"])
        assert hook["secret"].startswith("whsec_") and hook["events"] == ["sandbox.state"]
        assert mine.list_webhooks() == [{k: v for k, v in hook.items() if k != "secret"}]
        assert theirs.list_webhooks() == []
        with pytest.raises(corral.NotFound):
            theirs.delete_webhook(hook["id"])
        with Sandbox.create(runtime="namespaces", client=mine) as sandbox:
            pass
        with Sandbox.create(runtime="namespaces", client=theirs) as elsewhere:
            pass
        until(lambda: "terminated" in states(receiver.at("/flaky"), sandbox.id), 60)
        got = receiver.at("/flaky")
        assert all(verified(hook["secret"], d) for d in got)
        assert not states(got, elsewhere.id)  # another key's sandbox: not this key's webhook
        # The first event failed twice and was sent again, after 1 s then 2 s: same event id.
        first = [d for d in got if d["body"]["id"] == got[0]["body"]["id"]]
        assert len(first) == 3
        gaps = [b["when"] - a["when"] for a, b in itertools.pairwise(first)]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps
        assert states(got, sandbox.id)[-1] == "terminated"
        # The operator's webhook saw both keys' sandboxes, each event naming its key.
        until(lambda: "terminated" in states(receiver.at("/operator"), elsewhere.id), 60)
        operator = receiver.at("/operator")
        assert all(verified(OPERATOR_SECRET, d) for d in operator)
        assert states(operator, sandbox.id) and states(operator, elsewhere.id)
        keys = {d["body"]["data"]["sandbox_id"]: d["body"]["data"]["key_id"] for d in operator}
        assert keys[sandbox.id] != keys[elsewhere.id]
        mine.delete_webhook(hook["id"])
        assert mine.list_webhooks() == []


def test_a_receiver_that_hangs_holds_nothing_up(
    server: Server, receiver: Receiver, client: Client
) -> None:
    port = receiver.server_address[1]
    slow = client.create_webhook(f"http://localhost:{port}/slow")
    try:
        start = time.monotonic()
        for _ in range(3):
            with Sandbox.create(runtime="namespaces", client=client) as sandbox:
                assert sandbox.run("true").exit_code == 0
        assert time.monotonic() - start < 60  # a bound that catches a hang only
        until(lambda: len(receiver.at("/slow")) >= 1)
    finally:
        client.delete_webhook(slow["id"])


@pytest.mark.parametrize(
    ("url", "events"),
    [
        ("http://127.0.0.1:9/hook", None),  # loopback, not allowed by name
        ("http://169.254.169.254/latest", None),  # cloud metadata
        ("http://10.0.0.1/hook", None),
        ("ftp://localhost/hook", None),
        ("http://user:secret@localhost/hook", None),
        ("localhost/hook", None),
        ("http://localhost/hook", ["sandbox.nope"]),
        ("http://localhost/hook", []),
        ("x" * 3000, None),
        (7, None),
    ],
)
def test_bad_webhooks_are_refused(server: Server, url: object, events: object) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    answer = httpx.post(f"{server.url}/v1/webhooks", json={"url": url, "events": events},
                        headers=headers)  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] in ("invalid_webhook", "invalid_request")
    assert answer.json()["error"]["message"]
    listed = httpx.get(f"{server.url}/v1/webhooks", headers=headers).json()
    assert all(hook["url"] != url for hook in listed)
