/** A process running in a sandbox, driven over the exec WebSocket. */

import { bytes } from "./client.js";
import { ConnectionFailed, CorralError, errorFrom } from "./errors.js";
import type { Message, Socket } from "./websocket.js";

const STDIN = 0;
const STDOUT = 1;
const STDERR = 2;

/** Called with each chunk of a process's output as it arrives. */
export type OutputCallback = (chunk: Uint8Array) => void | Promise<void>;

/** How a streamed process ended. */
export interface ProcessExit {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
  oomKilled: boolean;
}

/** One output stream of a process: iterate it for chunks of bytes as they arrive. */
export class Output implements AsyncIterable<Uint8Array> {
  private readonly chunks: (Uint8Array | null)[] = [];
  private waiting: (() => void) | undefined;
  private ended = false;

  /** @internal */
  put(chunk: Uint8Array | null): void {
    this.chunks.push(chunk);
    const waiting = this.waiting;
    this.waiting = undefined;
    waiting?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Uint8Array> {
    while (!this.ended) {
      while (this.chunks.length === 0) await new Promise<void>((resolve) => (this.waiting = resolve));
      const chunk = this.chunks.shift()!;
      if (chunk === null) {
        this.ended = true;
        return;
      }
      yield chunk;
    }
  }

  /** Everything (left) on the stream, once the process has ended. */
  async read(): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    for await (const chunk of this) parts.push(chunk);
    return bytes(parts);
  }

  /** Everything (left) on the stream as UTF-8 text, once the process has ended. */
  async text(): Promise<string> {
    return new TextDecoder().decode(await this.read());
  }
}

/** The process's standard input (or its terminal's keyboard). */
export class Stdin {
  constructor(private readonly process: Process) {}

  async write(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    const frame = new Uint8Array(bytes.length + 1);
    frame[0] = STDIN;
    frame.set(bytes, 1);
    await this.process.send(frame);
  }

  /** End of input: EOF on a pipe, ^D on a terminal. */
  async close(): Promise<void> {
    await this.process.send(JSON.stringify({ type: "stdin_close" }));
  }
}

/**
 * A command started with `sandbox.exec`.
 *
 * @example
 * const proc = await sandbox.exec(["python3", "-c", "print(input()[::-1])"], { stdin: true });
 * await proc.stdin.write("hello\n");
 * await proc.stdin.close();
 * console.log(await proc.stdout.text()); // "olleh\n"
 * console.log(await proc.wait()); // 0
 */
export class Process {
  readonly id: number;
  readonly pid: number;
  readonly stdout = new Output();
  readonly stderr = new Output();
  readonly stdin = new Stdin(this);
  private exit: ProcessExit | undefined;
  private error: CorralError | undefined;
  private readonly reader: Promise<void>;

  private constructor(
    private readonly socket: Socket,
    started: { id: number; pid: number },
    private readonly callbacks: Record<number, OutputCallback | undefined>,
  ) {
    this.id = started.id;
    this.pid = started.pid;
    this.reader = this.read();
  }

  /** @internal Send the request on an open exec socket; the process once it has started. */
  static async start(
    socket: Socket,
    request: Record<string, unknown>,
    onStdout?: OutputCallback,
    onStderr?: OutputCallback,
  ): Promise<Process> {
    await socket.send(JSON.stringify(request));
    const first = await socket.next();
    if (typeof first !== "string") {
      await socket.close();
      throw new ConnectionFailed("the exec stream closed before the process started");
    }
    const started = JSON.parse(first) as Record<string, unknown>;
    if (started.type === "error") {
      await socket.close();
      throw streamError(started);
    }
    return new Process(socket, started as { id: number; pid: number }, { [STDOUT]: onStdout, [STDERR]: onStderr });
  }

  private async read(): Promise<void> {
    const outputs: Record<number, Output> = { [STDOUT]: this.stdout, [STDERR]: this.stderr };
    try {
      for await (const message of this.socket.messages()) await this.take(message, outputs);
    } finally {
      if (this.exit === undefined && this.error === undefined) {
        this.error = new ConnectionFailed("the exec stream closed before the process ended");
      }
      this.stdout.put(null);
      this.stderr.put(null);
    }
  }

  private async take(message: Message, outputs: Record<number, Output>): Promise<void> {
    if (typeof message !== "string") {
      const channel = message[0]!;
      const data = message.subarray(1);
      const callback = this.callbacks[channel];
      if (callback !== undefined) await callback(data);
      else outputs[channel]?.put(data);
      return;
    }
    const event = JSON.parse(message) as Record<string, unknown>;
    if (event.type === "exit") {
      this.exit = {
        exitCode: (event.exit_code as number | null | undefined) ?? null,
        signal: (event.signal as number | null | undefined) ?? null,
        timedOut: Boolean(event.timed_out),
        oomKilled: Boolean(event.oom_killed),
      };
    } else if (event.type === "error") {
      this.error = streamError(event);
    }
  }

  /** @internal */
  async send(frame: string | Uint8Array): Promise<void> {
    try {
      await this.socket.send(frame);
    } catch (error) {
      throw this.error ?? error;
    }
  }

  /** Wait for the process to end; its exit code (128 + the signal if killed, as in sh). */
  async wait(): Promise<number> {
    const result = await this.result();
    return result.exitCode ?? 128 + (result.signal ?? 0);
  }

  /** Wait for the process to end; how it ended, in full. */
  async result(): Promise<ProcessExit> {
    await this.reader;
    if (this.exit === undefined) throw this.error!;
    return this.exit;
  }

  /** Send a signal ("SIGTERM", "SIGINT", ... or a number) to the process and its group. */
  async signal(signal: string | number = "SIGTERM"): Promise<void> {
    await this.send(JSON.stringify({ type: "signal", signal }));
  }

  /** Kill the process and everything it started, whatever its group (SIGKILL). */
  async kill(): Promise<void> {
    await this.signal("SIGKILL");
  }

  /** Resize the terminal of a process started with `pty`. */
  async resize(rows: number, cols: number): Promise<void> {
    await this.send(JSON.stringify({ type: "resize", rows, cols }));
  }

  /** Hang up: the server kills the process if it is still running. */
  async close(): Promise<void> {
    await this.socket.close();
    await this.reader;
  }
}

function streamError(event: Record<string, unknown>): CorralError {
  const error = (event.error ?? {}) as { code?: unknown; message?: unknown };
  return errorFrom(
    Number(event.status ?? 500),
    String(error.code ?? "stream_error"),
    String(error.message ?? "the exec stream failed"),
  );
}
