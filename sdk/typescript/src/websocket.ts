/**
 * A small WebSocket client (RFC 6455) on Node's own http, https and net modules.
 *
 * Node 20 has no WebSocket without a flag, and the standard WebSocket API cannot send an
 * `Authorization` header, which is how Corral's streams are authorised. This client sends it,
 * speaks text and binary messages, answers pings, and reports a refused upgrade as the server's
 * own error.
 */

import { createHash, randomBytes } from "node:crypto";
import * as http from "node:http";
import * as https from "node:https";
import type { Duplex } from "node:stream";

import { ConnectionFailed, CorralError, errorOfBody, unreachable } from "./errors.js";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const TEXT = 0x1;
const BINARY = 0x2;
const CLOSE = 0x8;
const PING = 0x9;
const PONG = 0xa;

export type Message = string | Uint8Array;

export class Socket {
  private buffer: Buffer = Buffer.alloc(0);
  private fragments: Buffer[] = [];
  private fragmentOpcode = 0;
  private readonly queue: Message[] = [];
  private waiting: (() => void) | undefined;
  /** Set once the connection is gone; the close code the server sent, if it sent one. */
  closed = false;
  closeCode: number | undefined;

  constructor(private readonly socket: Duplex, head: Buffer) {
    socket.on("data", (data: Buffer) => this.receive(data));
    socket.on("close", () => this.end());
    socket.on("error", () => this.end());
    if (head.length > 0) this.receive(head);
  }

  /** Open a WebSocket to `url` (ws: or wss:), sending `headers` with the upgrade request. */
  static connect(url: string, headers: Record<string, string>, timeoutMs = 10_000): Promise<Socket> {
    const target = new URL(url);
    const secure = target.protocol === "wss:";
    const key = randomBytes(16).toString("base64");
    const request = (secure ? https : http).request({
      hostname: target.hostname.replace(/^\[|\]$/g, ""),
      port: target.port || (secure ? 443 : 80),
      path: target.pathname + target.search,
      headers: {
        ...headers,
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
      },
      timeout: timeoutMs,
    });
    return new Promise<Socket>((resolve, reject) => {
      request.on("upgrade", (response: http.IncomingMessage, socket: Duplex, head: Buffer) => {
        const expected = createHash("sha1").update(key + GUID).digest("base64");
        if (response.headers["sec-websocket-accept"] !== expected) {
          socket.destroy();
          reject(new ConnectionFailed(`${url} answered with a bad WebSocket handshake`));
          return;
        }
        (socket as { setTimeout?: (ms: number) => void }).setTimeout?.(0);
        resolve(new Socket(socket, head));
      });
      request.on("response", (response: http.IncomingMessage) => {
        const chunks: Buffer[] = [];
        response.on("data", (chunk: Buffer) => chunks.push(chunk));
        response.on("end", () => {
          const body = Buffer.concat(chunks).toString();
          reject(errorOfBody(response.statusCode ?? 500, body, response.headers["retry-after"] as string));
        });
      });
      request.on("timeout", () => request.destroy(new Error(`no answer in ${timeoutMs} ms`)));
      request.on("error", (error: Error) => reject(error instanceof CorralError ? error : unreachable(url, error)));
      request.end();
    });
  }

  /** Let the program exit while this socket is open (it waits for nothing on it). */
  unref(): void {
    (this.socket as { unref?: () => void }).unref?.();
  }

  /** Keep the program running while this socket is open (the default). */
  ref(): void {
    (this.socket as { ref?: () => void }).ref?.();
  }

  /** Send a text (string) or binary (bytes) message. */
  send(message: Message): Promise<void> {
    if (this.closed) return Promise.reject(new ConnectionFailed("the stream is closed"));
    const payload = typeof message === "string" ? Buffer.from(message) : Buffer.from(message);
    return this.write(typeof message === "string" ? TEXT : BINARY, payload);
  }

  /** The next message, or undefined once the socket has closed. */
  async next(): Promise<Message | undefined> {
    while (this.queue.length === 0) {
      if (this.closed) return undefined;
      await new Promise<void>((resolve) => (this.waiting = resolve));
    }
    return this.queue.shift();
  }

  /** Every message until the socket closes, however it closes. */
  async *messages(): AsyncGenerator<Message> {
    for (;;) {
      const message = await this.next();
      if (message === undefined) return;
      yield message;
    }
  }

  /** Close the connection (code 1000), without waiting for the server's answer. */
  async close(): Promise<void> {
    if (this.closed) return;
    const payload = Buffer.alloc(2);
    payload.writeUInt16BE(1000);
    await this.write(CLOSE, payload).catch(() => undefined);
    this.socket.end();
    this.end();
  }

  private write(opcode: number, payload: Buffer): Promise<void> {
    const mask = randomBytes(4);
    let header: Buffer;
    if (payload.length < 126) {
      header = Buffer.from([0x80 | opcode, 0x80 | payload.length]);
    } else if (payload.length < 65536) {
      header = Buffer.alloc(4);
      header[0] = 0x80 | opcode;
      header[1] = 0x80 | 126;
      header.writeUInt16BE(payload.length, 2);
    } else {
      header = Buffer.alloc(10);
      header[0] = 0x80 | opcode;
      header[1] = 0x80 | 127;
      header.writeBigUInt64BE(BigInt(payload.length), 2);
    }
    const masked = Buffer.alloc(payload.length);
    for (let i = 0; i < payload.length; i++) masked[i] = payload[i]! ^ mask[i & 3]!;
    return new Promise<void>((resolve, reject) => {
      this.socket.write(Buffer.concat([header, mask, masked]), (error) =>
        error ? reject(new ConnectionFailed(`the stream is closed: ${error.message}`)) : resolve(),
      );
    });
  }

  private receive(data: Buffer): void {
    this.buffer = this.buffer.length === 0 ? data : Buffer.concat([this.buffer, data]);
    for (;;) {
      const frame = this.frame();
      if (frame === undefined) return;
      this.handle(frame.fin, frame.opcode, frame.payload);
    }
  }

  /** The next whole frame in the buffer, taken out of it. */
  private frame(): { fin: boolean; opcode: number; payload: Buffer } | undefined {
    const buffer = this.buffer;
    if (buffer.length < 2) return undefined;
    let length = buffer[1]! & 0x7f;
    let offset = 2;
    if (length === 126) {
      if (buffer.length < 4) return undefined;
      length = buffer.readUInt16BE(2);
      offset = 4;
    } else if (length === 127) {
      if (buffer.length < 10) return undefined;
      length = Number(buffer.readBigUInt64BE(2));
      offset = 10;
    }
    const masked = (buffer[1]! & 0x80) !== 0;
    const start = offset + (masked ? 4 : 0);
    if (buffer.length < start + length) return undefined;
    const payload = Buffer.from(buffer.subarray(start, start + length));
    if (masked) {
      for (let i = 0; i < payload.length; i++) payload[i]! ^= buffer[offset + (i & 3)]!;
    }
    this.buffer = buffer.subarray(start + length);
    return { fin: (buffer[0]! & 0x80) !== 0, opcode: buffer[0]! & 0x0f, payload };
  }

  private handle(fin: boolean, opcode: number, payload: Buffer): void {
    if (opcode === PING) {
      void this.write(PONG, payload).catch(() => undefined);
    } else if (opcode === CLOSE) {
      this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      void this.write(CLOSE, payload.subarray(0, 2)).catch(() => undefined);
      this.socket.end();
      this.end();
    } else if (opcode === TEXT || opcode === BINARY || opcode === 0) {
      if (opcode !== 0) this.fragmentOpcode = opcode;
      this.fragments.push(payload);
      if (!fin) return;
      const whole = Buffer.concat(this.fragments);
      this.fragments = [];
      this.queue.push(this.fragmentOpcode === TEXT ? whole.toString("utf8") : new Uint8Array(whole));
      this.wake();
    }
  }

  private end(): void {
    this.closed = true;
    this.wake();
  }

  private wake(): void {
    const waiting = this.waiting;
    this.waiting = undefined;
    waiting?.();
  }
}
