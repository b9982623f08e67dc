/**
 * A connection to one Corral server: its URL and API key, and the HTTP requests and WebSockets
 * every other part of the SDK goes through, with the server's errors turned into Corral's.
 */

import { AuthError, ConnectionFailed, CorralError, errorOfBody, unreachable } from "./errors.js";
import type { Schemas } from "./types.js";
import { Socket } from "./websocket.js";

export const DEFAULT_URL = "http://127.0.0.1:8470";

export interface ClientOptions {
  /** The server; default `$CORRAL_URL`, else http://127.0.0.1:8470. */
  url?: string;
  /** The API key; default `$CORRAL_API_KEY`. */
  apiKey?: string;
  /** How long one request may take, in seconds (default 300). */
  timeout?: number;
}

export type Query = Record<string, string | number | boolean | null | undefined> | [string, string][];
export type Body = string | Uint8Array | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

export interface RequestOptions {
  json?: unknown;
  query?: Query;
  body?: Body;
  /** Seconds; the client's timeout unless given (null: none). */
  timeout?: number | null;
}

/**
 * One Corral server with one API key. Most programs never make one: `Sandbox.create()` and the
 * rest use `Client.default()`, configured from `CORRAL_URL` and `CORRAL_API_KEY`.
 *
 * For a server with a certificate from a CA of its own (`corral serve --tls auto`), start Node
 * with `NODE_EXTRA_CA_CERTS` set to the CA file the server printed.
 */
export class Client {
  readonly url: string;
  readonly apiKey: string | undefined;
  readonly timeout: number;
  private static shared: Client | undefined;

  constructor(options: ClientOptions = {}) {
    this.url = (options.url ?? process.env.CORRAL_URL ?? DEFAULT_URL).replace(/\/+$/, "");
    this.apiKey = options.apiKey ?? (process.env.CORRAL_API_KEY || undefined);
    this.timeout = options.timeout ?? 300;
    if (!/^https?:\/\//.test(this.url)) {
      throw new CorralError(`${this.url} is not an http:// or https:// URL (CORRAL_URL or url)`, "invalid_url", 400);
    }
  }

  /** The client made from the environment, shared by calls that are given none. */
  static default(): Client {
    Client.shared ??= new Client();
    return Client.shared;
  }

  /** Send one request; the decoded JSON answer (undefined for an empty one). */
  async request<T = unknown>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    const response = await this.fetch(method, path, options);
    const text = await response.text();
    return (text ? JSON.parse(text) : undefined) as T;
  }

  /** A request whose answer streams: its errors are thrown before any content is read. */
  async fetch(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
    const headers: Record<string, string> = this.headers();
    let body: BodyInit | undefined;
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(options.json);
    } else if (options.body !== undefined) {
      body = toBody(options.body);
    }
    const timeout = options.timeout === undefined ? this.timeout : options.timeout;
    let response: Response;
    try {
      response = await fetch(this.url + path + queryString(options.query), {
        method,
        headers,
        body,
        signal: timeout === null ? undefined : AbortSignal.timeout(timeout * 1000),
        // A streamed body is sent as it is read.
        ...(body instanceof ReadableStream ? { duplex: "half" } : {}),
      } as RequestInit);
    } catch (error) {
      throw this.unreachable(error);
    }
    if (response.status >= 400) {
      throw errorOfBody(response.status, await response.text(), response.headers.get("retry-after"));
    }
    return response;
  }

  /** Whether HEAD `path` finds something (200) rather than nothing (404). */
  async exists(path: string): Promise<boolean> {
    let response: Response;
    try {
      response = await fetch(this.url + path, { method: "HEAD", headers: this.headers() });
    } catch (error) {
      throw this.unreachable(error);
    }
    if (response.status !== 200 && response.status !== 404) throw errorOfBody(response.status, "");
    return response.status === 200;
  }

  /** Open a WebSocket to `path` with this client's key. */
  websocket(path: string): Promise<Socket> {
    return Socket.connect("ws" + this.url.slice("http".length) + path, this.headers());
  }

  /** Your snapshots, oldest first. */
  listSnapshots(): Promise<Schemas["SnapshotOut"][]> {
    return this.request("GET", "/v1/snapshots");
  }

  /** One of your snapshots, by id or name. */
  getSnapshot(ref: string): Promise<Schemas["SnapshotOut"]> {
    return this.request("GET", `/v1/snapshots/${encodeURIComponent(ref)}`);
  }

  /** Delete one of your snapshots, by id or name. */
  async deleteSnapshot(ref: string): Promise<void> {
    await this.request("DELETE", `/v1/snapshots/${encodeURIComponent(ref)}`);
  }

  /** The images you built, oldest first. */
  listImages(): Promise<Schemas["ImageOut"][]> {
    return this.request("GET", "/v1/images");
  }

  /** One of your images, by id or name. */
  getImage(ref: string): Promise<Schemas["ImageOut"]> {
    return this.request("GET", `/v1/images/${encodeURIComponent(ref)}`);
  }

  /** Remove one of your images, by id or name. */
  async removeImage(ref: string): Promise<void> {
    await this.request("DELETE", `/v1/images/${encodeURIComponent(ref)}`);
  }

  /**
   * State changes of your sandboxes (or of one) as they happen, from `GET /v1/events`, until
   * you stop iterating.
   */
  async *events(sandboxId?: string): AsyncGenerator<Record<string, unknown>> {
    const response = await this.fetch("GET", "/v1/events", {
      query: { sandbox_id: sandboxId },
      timeout: null,
    });
    for await (const line of lines(response)) {
      if (line.startsWith("data: ")) yield JSON.parse(line.slice("data: ".length)) as Record<string, unknown>;
    }
  }

  private headers(): Record<string, string> {
    if (!this.apiKey) {
      throw new AuthError("no API key: set CORRAL_API_KEY or pass apiKey (corral serve prints one)");
    }
    return { Authorization: `Bearer ${this.apiKey}` };
  }

  private unreachable(error: unknown): CorralError {
    if (error instanceof CorralError) return error;
    const cause = error instanceof Error ? (error.cause as Error | undefined) : undefined;
    const reason = cause?.message ?? (error instanceof Error ? error.message : String(error));
    if (error instanceof Error && error.name === "TimeoutError") {
      return new ConnectionFailed(`the Corral server at ${this.url} did not answer in time (${reason})`);
    }
    return unreachable(this.url, cause ?? error);
  }
}

/** Chunks joined into one plain `Uint8Array` (not a Node `Buffer`). */
export function bytes(parts: Uint8Array[]): Uint8Array {
  const whole = Buffer.concat(parts);
  return new Uint8Array(whole.buffer, whole.byteOffset, whole.length);
}

/** The text lines of a streamed answer, as they arrive. */
export async function* lines(response: Response): AsyncGenerator<string> {
  if (response.body === null) return;
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
    pending += decoder.decode(chunk, { stream: true });
    const parts = pending.split("\n");
    pending = parts.pop() ?? "";
    yield* parts;
  }
  pending += decoder.decode();
  if (pending) yield pending;
}

function queryString(query: Query | undefined): string {
  if (query === undefined) return "";
  const params = new URLSearchParams();
  const entries = Array.isArray(query) ? query : Object.entries(query);
  for (const [name, value] of entries) {
    if (value !== undefined && value !== null) params.append(name, String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

function toBody(body: Body): BodyInit {
  if (typeof body === "string" || body instanceof Uint8Array || body instanceof ReadableStream) {
    return body as BodyInit;
  }
  const iterator = body[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { value, done } = await iterator.next();
      if (done) controller.close();
      else controller.enqueue(value);
    },
    async cancel() {
      await iterator.return?.();
    },
  });
}
