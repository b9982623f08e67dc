"""A WebSocket echo server for tests, run inside sandboxes (standard library only): each
message comes back as it was sent, text as text and bytes as bytes; "close" closes, and
"headers" answers with the headers of the request that opened the socket."""

import base64
import hashlib
import socket
import struct
import sys
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_exactly(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def send_frame(conn, opcode, payload):
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    conn.sendall(header + payload)


def serve(conn):
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    headers = dict(line.split(b": ", 1) for line in request.split(b"\r\n")[1:] if b": " in line)
    key = (
        headers[b"Sec-WebSocket-Key"]
        if b"Sec-WebSocket-Key" in headers
        else headers[b"sec-websocket-key"]
    )
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324 - RFC 6455 says SHA-1
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    try:
        while True:
            first, second = read_exactly(conn, 2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                size = struct.unpack("!H", read_exactly(conn, 2))[0]
            elif size == 127:
                size = struct.unpack("!Q", read_exactly(conn, 8))[0]
            mask = read_exactly(conn, 4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(read_exactly(conn, size)))
            if opcode == 8 or data == b"close":
                send_frame(conn, 8, struct.pack("!H", 1000))
                return
            if opcode == 9:
                send_frame(conn, 10, data)
            elif data == b"headers":
                send_frame(conn, 1, request)
            elif opcode in (1, 2):
                send_frame(conn, opcode, data)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(16)
while True:
    connection, _ = listener.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
