/**
 * The code interpreter: `sandbox.runCode` and what it returns. An execution streams as events
 * over the sandbox's code WebSocket (one connection for many executions, told apart by an id):
 *
 *   {"type": "started", "context"}  {"type": "stdout" | "stderr", "text"}
 *   {"type": "result", "data": {mime: value}, "is_main_result"}
 *   {"type": "error", "name", "value", "traceback"}
 *   {"type": "end", "execution_count", "context", "timed_out", "context_lost", "truncated"}
 */

import { ConnectionFailed, CorralError, errorFrom } from "./errors.js";
import type { Socket } from "./websocket.js";

type Event = Record<string, unknown>;

/**
 * One rich result: the value of the code's last expression (`isMainResult`), something it
 * displayed, or a chart it left open. `data` is its MIME bundle; binary kinds (PNG, JPEG, PDF)
 * are base64 text there, and bytes through `png`, `jpeg` and `pdf`.
 */
export class Result {
  constructor(
    readonly data: Record<string, unknown>,
    readonly isMainResult = false,
  ) {}

  get text(): string | undefined {
    return this.string("text/plain");
  }
  get html(): string | undefined {
    return this.string("text/html");
  }
  get markdown(): string | undefined {
    return this.string("text/markdown");
  }
  get svg(): string | undefined {
    return this.string("image/svg+xml");
  }
  get latex(): string | undefined {
    return this.string("text/latex");
  }
  get javascript(): string | undefined {
    return this.string("application/javascript");
  }
  get json(): unknown {
    return this.data["application/json"];
  }
  /** A pandas DataFrame as data: `columns`, `dtypes`, `index`, `rows` (the first 100), `total_rows`. */
  get dataframe(): Record<string, unknown> | undefined {
    return this.object("application/vnd.corral.dataframe+json");
  }
  /** A matplotlib figure as data: its `title` and `axes`, each with `kind`, labels and `series`. */
  get chart(): Record<string, unknown> | undefined {
    return this.object("application/vnd.corral.chart+json");
  }
  get png(): Uint8Array | undefined {
    return this.bytes("image/png");
  }
  get jpeg(): Uint8Array | undefined {
    return this.bytes("image/jpeg");
  }
  get pdf(): Uint8Array | undefined {
    return this.bytes("application/pdf");
  }
  /** The MIME types this result has. */
  formats(): string[] {
    return Object.keys(this.data);
  }

  private string(mime: string): string | undefined {
    const value = this.data[mime];
    return typeof value === "string" ? value : undefined;
  }
  private object(mime: string): Record<string, unknown> | undefined {
    const value = this.data[mime];
    return typeof value === "object" && value !== null ? (value as Record<string, unknown>) : undefined;
  }
  private bytes(mime: string): Uint8Array | undefined {
    const value = this.data[mime];
    return typeof value === "string" ? new Uint8Array(Buffer.from(value, "base64")) : undefined;
  }
}

/** An error the code raised (or a timeout, or a lost context): not an API failure. */
export interface ExecutionError {
  name: string;
  value: string;
  traceback: string;
}

/** What one `runCode` produced, in order within each kind. */
export class Execution {
  results: Result[] = [];
  logs: { stdout: string[]; stderr: string[] } = { stdout: [], stderr: [] };
  error: ExecutionError | undefined;
  executionCount = 0;
  context: string | undefined;
  timedOut = false;
  contextLost = false;
  truncated = false;

  /** The main result's text, if the code ended with a value. */
  get text(): string | undefined {
    return this.results.find((result) => result.isMainResult)?.text;
  }

  /** @internal Fold one event in; what it added (a result, an error, output text). */
  add(event: Event): Result | ExecutionError | string | undefined {
    switch (event.type) {
      case "stdout":
      case "stderr": {
        const text = String(event.text ?? "");
        this.logs[event.type].push(text);
        return text;
      }
      case "result": {
        const result = new Result((event.data ?? {}) as Record<string, unknown>, Boolean(event.is_main_result));
        this.results.push(result);
        return result;
      }
      case "error":
        this.error = {
          name: String(event.name ?? ""),
          value: String(event.value ?? ""),
          traceback: String(event.traceback ?? ""),
        };
        return this.error;
      case "started":
        this.context = String(event.context);
        return undefined;
      case "end":
        this.executionCount = Number(event.execution_count ?? 0);
        this.context = String(event.context ?? this.context);
        this.timedOut = Boolean(event.timed_out);
        this.contextLost = Boolean(event.context_lost);
        this.truncated = Boolean(event.truncated);
        return undefined;
      default:
        return undefined;
    }
  }
}

/** An open code WebSocket, shared by a sandbox's `runCode` calls; `closed` once it ended. */
export class CodeStream {
  private readonly queues = new Map<number, { events: (Event | null)[]; wake?: () => void }>();
  private last = 0;
  closed = false;

  constructor(private readonly socket: Socket) {
    socket.unref(); // an idle code stream does not keep the program running
    void this.read();
  }

  /** Hang up: executions still running are interrupted. */
  async close(): Promise<void> {
    await this.socket.close();
  }

  /** The events of one execution of `body`; leaving early interrupts it. */
  async *run(body: Record<string, unknown>): AsyncGenerator<Event> {
    const id = ++this.last;
    const queue: { events: (Event | null)[]; wake?: () => void } = { events: [] };
    this.queues.set(id, queue);
    this.socket.ref();
    let ended = false;
    try {
      await this.socket.send(JSON.stringify({ ...body, id }));
      while (!ended) {
        while (queue.events.length === 0) await new Promise<void>((resolve) => (queue.wake = resolve));
        const event = queue.events.shift()!;
        if (event === null) throw new ConnectionFailed("the code stream closed during the execution");
        if (event.type === "failed") {
          ended = true;
          throw failure(event);
        }
        ended = event.type === "end";
        yield event;
      }
    } finally {
      this.queues.delete(id);
      if (this.queues.size === 0) this.socket.unref();
      if (!ended && !this.closed) {
        await this.socket.send(JSON.stringify({ type: "cancel", id })).catch(() => undefined);
      }
    }
  }

  private async read(): Promise<void> {
    try {
      for await (const message of this.socket.messages()) {
        const event = JSON.parse(String(message)) as Event;
        const queue = this.queues.get(event.id as number);
        delete event.id;
        if (queue !== undefined) push(queue, event);
      }
    } finally {
      this.closed = true;
      for (const queue of this.queues.values()) push(queue, null);
    }
  }
}

function push(queue: { events: (Event | null)[]; wake?: () => void }, event: Event | null): void {
  queue.events.push(event);
  const wake = queue.wake;
  queue.wake = undefined;
  wake?.();
}

function failure(event: Event): CorralError {
  const error = (event.error ?? {}) as { code?: unknown; message?: unknown };
  return errorFrom(Number(event.status ?? 500), String(error.code), String(error.message));
}
