/** Sandboxes as the SDK sees them: `Sandbox.create()`, commands, files, code, previews, state. */

import { Client } from "./client.js";
import { CodeStream, Execution, type ExecutionError, type Result } from "./code.js";
import { CommandTimeout, SandboxFailed } from "./errors.js";
import { Files } from "./files.js";
import { Image } from "./image.js";
import { Process, type OutputCallback } from "./process.js";
import type {
  BuiltImage,
  CodeContext,
  PreviewInfo,
  ProcessInfo,
  SandboxInfo,
  Schemas,
  SnapshotInfo,
} from "./types.js";
import { mountsBody, type VolumeRef } from "./volume.js";

/** Internet access with egress rules (see docs/network.md): host names, `*.` wildcards, CIDRs. */
export interface Network {
  /** What may be reached; undefined allows everything not denied. */
  allow?: string[];
  /** What may never be reached; wins over `allow`. */
  deny?: string[];
}

export interface CreateOptions {
  /** "debian" (the default), "host", the id or name of an image you built, or an `Image` recipe. */
  image?: string | Image | BuiltImage;
  /** "namespaces" or "gvisor"; the server's default unless given. */
  runtime?: string;
  cpu?: number;
  memoryMb?: number;
  diskMb?: number;
  maxProcesses?: number;
  /** Lifetime in seconds, counted only while running. */
  timeout?: number;
  env?: Record<string, string>;
  metadata?: Record<string, string>;
  workdir?: string;
  /** "none" (the default), "internet", or egress rules. */
  network?: "none" | "internet" | Network;
  /** Mount points to volumes: `{ "/data": volume, "/ref": other.readOnly() }`. */
  volumes?: Record<string, VolumeRef>;
  /** Take a started sandbox from a matching warm pool (default true). */
  pool?: boolean;
  autoResume?: boolean;
  /** Seconds without use before `onIdle` ("pause", "hibernate", "terminate"). */
  idleTimeout?: number | null;
  onIdle?: "pause" | "hibernate" | "terminate";
  keepAlive?: boolean;
  onTimeout?: "terminate" | "hibernate";
  /** Start where this snapshot's sandbox was (gvisor). */
  snapshot?: string | SnapshotInfo;
  client?: Client;
}

/** How a command run with `run` ended, and its output (decoded as UTF-8). */
export interface CommandResult {
  exitCode: number | null;
  stdout: string;
  stderr: string;
  signal: number | null;
  timedOut: boolean;
  oomKilled: boolean;
  /** The server kept only the first 8 MiB of each stream. */
  truncated: boolean;
}

export interface RunOptions {
  /** Seconds before it is killed (`CommandTimeout`); default 60, null for none. */
  timeout?: number | null;
  env?: Record<string, string>;
  cwd?: string;
  user?: string | number;
  stdin?: string;
}

export interface ExecOptions {
  /** Keep its standard input open for `process.stdin`. */
  stdin?: boolean;
  /** Give it a terminal: true (24 x 80) or `[rows, cols]`. */
  pty?: boolean | [number, number];
  env?: Record<string, string>;
  cwd?: string;
  user?: string | number;
  /** Seconds before it is killed. */
  timeout?: number | null;
  /** Each chunk goes here instead of `process.stdout`. */
  onStdout?: OutputCallback;
  onStderr?: OutputCallback;
}

export interface RunCodeOptions {
  /** "python" (default), "javascript" or "bash". */
  language?: string;
  /** The context (or its id) to run in; the language's default context otherwise. */
  context?: string | CodeContext;
  env?: Record<string, string>;
  /** Seconds; past it the code is interrupted and its variables kept. */
  timeout?: number | null;
  onStdout?: (text: string) => void | Promise<void>;
  onStderr?: (text: string) => void | Promise<void>;
  onResult?: (result: Result) => void | Promise<void>;
  onError?: (error: ExecutionError) => void | Promise<void>;
}

const SPEC_NAMES: [keyof CreateOptions, string][] = [
  ["runtime", "runtime"],
  ["cpu", "cpu"],
  ["memoryMb", "memory_mb"],
  ["diskMb", "disk_mb"],
  ["maxProcesses", "max_processes"],
  ["timeout", "timeout"],
  ["env", "env"],
  ["metadata", "metadata"],
  ["workdir", "workdir"],
  ["pool", "pool"],
  ["autoResume", "auto_resume"],
  ["idleTimeout", "idle_timeout"],
  ["onIdle", "on_idle"],
  ["keepAlive", "keep_alive"],
  ["onTimeout", "on_timeout"],
];

/**
 * A sandbox on a Corral server.
 *
 * @example
 * const sandbox = await Sandbox.create({ runtime: "gvisor" });
 * console.log((await sandbox.run("python3 -c 'print(6*7)'")).stdout); // "42\n"
 * await sandbox.terminate();
 */
export class Sandbox {
  /** Its files: `sandbox.files.write(path, data)`, `read`, `list`, ... */
  readonly files: Files;
  private codeStream: CodeStream | undefined;

  private constructor(
    readonly client: Client,
    private data: SandboxInfo,
  ) {
    this.files = new Files(client, data.id);
  }

  get id(): string {
    return this.data.id;
  }

  /** The state when last fetched; `await info()` refreshes it. */
  get state(): string {
    return this.data.state;
  }

  /** Create a sandbox and return once it can run commands. */
  static async create(options: CreateOptions = {}): Promise<Sandbox> {
    const client = options.client ?? Client.default();
    const body: Record<string, unknown> = {};
    for (const [option, name] of SPEC_NAMES) {
      if (options[option] !== undefined) body[name] = options[option];
    }
    let image = options.image;
    if (image instanceof Image) image = await image.build({ client });
    if (image !== undefined) body.image = typeof image === "string" ? image : image.id;
    const network = options.network;
    if (typeof network === "object") {
      body.network = "internet";
      body.egress = { allow: network.allow ?? null, deny: network.deny ?? [] };
    } else if (network !== undefined) {
      body.network = network;
    }
    if (options.volumes !== undefined) body.volumes = mountsBody(options.volumes);
    const snapshot = options.snapshot;
    if (snapshot !== undefined) body.snapshot = typeof snapshot === "string" ? snapshot : snapshot.id;
    return new Sandbox(client, await client.request<SandboxInfo>("POST", "/v1/sandboxes", { json: body }));
  }

  /**
   * An existing sandbox by id (`SandboxNotFound` if your key has none such). A paused or
   * hibernated one is resumed first, unless it was created with `autoResume: false`.
   */
  static async connect(sandboxId: string, options: { client?: Client } = {}): Promise<Sandbox> {
    const client = options.client ?? Client.default();
    const sandbox = new Sandbox(client, await client.request<SandboxInfo>("GET", `/v1/sandboxes/${encodeURIComponent(sandboxId)}`));
    if (sandbox.data.spec.auto_resume) {
      if (sandbox.state === "paused") await sandbox.resume();
      else if (sandbox.state === "hibernated") await sandbox.wake();
    }
    return sandbox;
  }

  /** Your sandboxes (ended ones for 7 days), optionally filtered by metadata and state. */
  static list(options: { metadata?: Record<string, string>; state?: string; client?: Client } = {}): Promise<SandboxInfo[]> {
    const client = options.client ?? Client.default();
    const query: [string, string][] = Object.entries(options.metadata ?? {}).map(([k, v]) => ["metadata", `${k}=${v}`]);
    if (options.state !== undefined) query.push(["state", options.state]);
    return client.request("GET", "/v1/sandboxes", { query });
  }

  /** Its current state, spec and (once ended) end reason. */
  async info(): Promise<SandboxInfo> {
    return this.update("GET", "");
  }

  /** End the sandbox `seconds` from now (extends or shortens its life; at most 24 h). */
  async setTimeout(seconds: number): Promise<SandboxInfo> {
    return this.update("POST", "/timeout", { timeout: seconds });
  }

  /** Change where this internet sandbox may connect, from now on. */
  async setNetwork(network: Network): Promise<SandboxInfo> {
    return this.update("PUT", "/network", { allow: network.allow ?? null, deny: network.deny ?? [] });
  }

  /** CPU, memory, processes, disk and network samples over the last ten minutes, oldest first. */
  async metrics(): Promise<Record<string, number>[]> {
    return (await this.client.request<{ samples: Record<string, number>[] }>("GET", this.path("/metrics"))).samples;
  }

  /** End the sandbox now; its processes are killed and its files deleted. */
  async terminate(): Promise<SandboxInfo> {
    await this.codeStream?.close();
    return this.update("DELETE", "");
  }

  /** Freeze every process: memory stays, CPU use and the lifetime stop. */
  async pause(): Promise<SandboxInfo> {
    return this.update("POST", "/pause");
  }

  /** Thaw a paused sandbox (any use does it too, with `autoResume`). */
  async resume(): Promise<SandboxInfo> {
    return this.update("POST", "/resume");
  }

  /** Write memory and files to disk and stop (gvisor), until `wake` or any use. */
  async hibernate(): Promise<SandboxInfo> {
    return this.update("POST", "/hibernate");
  }

  /** Restore a hibernated sandbox exactly: processes, memory, open files, listeners. */
  async wake(): Promise<SandboxInfo> {
    return this.update("POST", "/wake");
  }

  /** Save memory and files (gvisor); the sandbox goes on. `Sandbox.create({ snapshot })` starts copies. */
  snapshot(options: { name?: string; ttl?: number } = {}): Promise<SnapshotInfo> {
    return this.client.request("POST", this.path("/snapshot"), { json: { name: options.name ?? null, ttl: options.ttl ?? null } });
  }

  /** A new image: this sandbox's image plus every file it changed (the sandbox goes on). */
  snapshotFilesystem(options: { name?: string } = {}): Promise<BuiltImage> {
    return this.client.request("POST", this.path("/filesystem-snapshot"), { json: { name: options.name ?? null } });
  }

  /** `count` new sandboxes with this one's memory and files, diverging from now on (gvisor). */
  async fork(count: number): Promise<Sandbox[]> {
    const made = await this.client.request<SandboxInfo[]>("POST", this.path("/fork"), { json: { count } });
    return made.map((info) => new Sandbox(this.client, info));
  }

  /**
   * Run a command to completion: a string through the shell, an array as an argv.
   * Throws `CommandTimeout` (with `.result`) if it ran past `timeout` seconds.
   */
  async run(cmd: string | string[], options: RunOptions = {}): Promise<CommandResult> {
    const timeout = options.timeout === undefined ? 60 : options.timeout;
    const json: Record<string, unknown> = {
      env: options.env ?? {},
      cwd: options.cwd ?? null,
      user: options.user ?? null,
      timeout,
      stdin: options.stdin ?? null,
      [typeof cmd === "string" ? "cmd" : "argv"]: cmd,
    };
    const data = await this.client.request<Schemas["CommandOut"]>("POST", this.path("/exec"), {
      json,
      timeout: timeout === null ? null : Math.max(this.client.timeout, timeout + 30),
    });
    const result: CommandResult = {
      exitCode: data.exit_code,
      stdout: data.stdout,
      stderr: data.stderr,
      signal: data.signal ?? null,
      timedOut: data.timed_out ?? false,
      oomKilled: data.oom_killed ?? false,
      truncated: data.truncated ?? false,
    };
    if (result.timedOut) {
      const error = new CommandTimeout(`the command ran past its ${timeout} s timeout and was killed`);
      error.result = result;
      throw error;
    }
    return result;
  }

  /**
   * Start a process and stream it: `exec(["ls", "-l"])`, or `exec("ls | wc -l")` through the
   * shell. With `onStdout`/`onStderr` each chunk goes to the callback instead of the streams.
   */
  async exec(cmd: string | string[], options: ExecOptions = {}): Promise<Process> {
    const request: Record<string, unknown> = {
      env: options.env ?? {},
      cwd: options.cwd ?? null,
      user: options.user ?? null,
      timeout: options.timeout ?? null,
      stdin: options.stdin ?? false,
      [typeof cmd === "string" ? "cmd" : "argv"]: cmd,
    };
    if (options.pty) {
      const [rows, cols] = options.pty === true ? [24, 80] : options.pty;
      request.pty = { rows, cols };
    }
    const socket = await this.client.websocket(this.path("/exec/stream"));
    return Process.start(socket, request, options.onStdout, options.onStderr);
  }

  /** Processes started in the sandbox, running and recently ended. */
  processes(): Promise<ProcessInfo[]> {
    return this.client.request("GET", this.path("/processes"));
  }

  /** Kill every process but Corral's agent; how many there were. Files stay. */
  async killAll(): Promise<number> {
    return (await this.client.request<{ killed: number }>("POST", this.path("/processes/kill-all"))).killed;
  }

  /**
   * Run `code` in a code context, where variables last from one call to the next. The value of
   * the last expression is the main result (`execution.text`); the code's own errors, a timeout
   * and a lost interpreter are `execution.error`, not exceptions.
   */
  async runCode(code: string, options: RunCodeOptions = {}): Promise<Execution> {
    const context = options.context;
    const body = {
      code,
      language: options.language ?? "python",
      context: typeof context === "object" ? context.id : (context ?? null),
      env: options.env ?? {},
      timeout: options.timeout ?? null,
    };
    const callbacks: Record<string, ((value: never) => void | Promise<void>) | undefined> = {
      stdout: options.onStdout,
      stderr: options.onStderr,
      result: options.onResult,
      error: options.onError,
    };
    if (this.codeStream === undefined || this.codeStream.closed) {
      this.codeStream = new CodeStream(await this.client.websocket(this.path("/code/stream")));
    }
    const execution = new Execution();
    for await (const event of this.codeStream.run(body)) {
      const added = execution.add(event);
      const callback = callbacks[String(event.type)];
      if (callback !== undefined && added !== undefined) await callback(added as never);
      if (event.type === "end") return execution;
    }
    throw new SandboxFailed("the server ended the execution's stream before its end");
  }

  /** A new code context, with its own interpreter, working directory and environment. */
  createCodeContext(options: { language?: string; cwd?: string; env?: Record<string, string> } = {}): Promise<CodeContext> {
    const json = { language: options.language ?? "python", cwd: options.cwd ?? null, env: options.env ?? {} };
    return this.client.request("POST", this.path("/code/contexts"), { json });
  }

  listCodeContexts(): Promise<CodeContext[]> {
    return this.client.request("GET", this.path("/code/contexts"));
  }

  /** A fresh interpreter for the context: its variables are gone, its settings kept. */
  restartCodeContext(context: string | CodeContext): Promise<CodeContext> {
    return this.client.request("POST", this.path(`/code/contexts/${contextId(context)}/restart`));
  }

  async removeCodeContext(context: string | CodeContext): Promise<void> {
    await this.client.request("DELETE", this.path(`/code/contexts/${contextId(context)}`));
  }

  /**
   * Open `port` to HTTP clients: a URL and a token that grants this port of this sandbox only
   * (send `preview.headers`, or open `preview.signed_url` in a browser). `public` lets anyone
   * with the URL in; `ttl` (seconds) makes it expire.
   */
  expose(port: number, options: { public?: boolean; ttl?: number } = {}): Promise<PreviewInfo> {
    const json = { port, public: options.public ?? false, ttl: options.ttl ?? null };
    return this.client.request("POST", this.path("/previews"), { json });
  }

  /** Its previews that are neither revoked nor expired (without tokens). */
  previews(): Promise<PreviewInfo[]> {
    return this.client.request("GET", this.path("/previews"));
  }

  /** Close a preview: its token, and its URL if public, stop working at once. */
  async revokePreview(preview: string | PreviewInfo): Promise<void> {
    const id = typeof preview === "string" ? preview : preview.id;
    await this.client.request("DELETE", this.path(`/previews/${encodeURIComponent(id)}`));
  }

  /** Terminate it when an `await using` block ends. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.terminate();
  }

  private async update(method: string, suffix: string, json?: unknown): Promise<SandboxInfo> {
    this.data = await this.client.request<SandboxInfo>(method, this.path(suffix), json === undefined ? {} : { json });
    return this.data;
  }

  private path(suffix = ""): string {
    return `/v1/sandboxes/${this.id}${suffix}`;
  }
}

function contextId(context: string | CodeContext): string {
  return encodeURIComponent(typeof context === "string" ? context : context.id);
}
