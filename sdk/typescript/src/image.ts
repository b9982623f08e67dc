/**
 * Images defined in code: `Image.debianSlim().pipInstall("numpy")`.
 *
 * An `Image` is an immutable recipe, a base and a chain of steps, each method returning a new
 * image. Nothing happens until it is built (`image.build()`, or `Sandbox.create({ image })`), on
 * the server, one cached layer per step. The server checks each step and says which is wrong.
 */

import { createReadStream, existsSync, statSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";


import { Client, lines } from "./client.js";
import { ImageBuildFailed, InvalidRequest, ServiceUnavailable } from "./errors.js";
import { digestOf, pack } from "./tar.js";
import type { BuiltImage } from "./types.js";

type Step = Record<string, unknown>;

/** A build's progress: a step started (`kind` "step") or a line of its output ("log"). */
export interface BuildEvent {
  kind: string;
  step: number;
  steps?: number;
  description?: string;
  cached?: boolean;
  line?: string;
}

export interface BuildOptions {
  /** A name to find the image by later (`image: "name"`). */
  name?: string;
  client?: Client;
  onProgress?: (event: BuildEvent) => void;
}

export class Image {
  private constructor(
    readonly base: Record<string, string>,
    readonly steps: readonly Step[] = [],
  ) {}

  /** Debian bookworm with python3 and pip: the default base. */
  static debianSlim(): Image {
    return new Image({ kind: "debian" });
  }

  /** `debianSlim` with IPython, numpy, pandas, matplotlib and Node.js: the code interpreter's image. */
  static codeInterpreter(): Image {
    return new Image({ kind: "code-interpreter" });
  }

  /** The server's own /usr, read-only: whatever the server machine has installed. */
  static host(): Image {
    return new Image({ kind: "host" });
  }

  /** An image the server pulls from an OCI registry, e.g. `python:3.12-slim`. */
  static fromRegistry(reference: string): Image {
    return new Image({ kind: "registry", reference });
  }

  /** Install Debian packages (apt-get, without recommends). */
  aptInstall(...packages: string[]): Image {
    return this.step({ kind: "apt_install", packages });
  }

  /** Install Python packages into the image's python3. */
  pipInstall(...packages: string[]): Image {
    return this.step({ kind: "pip_install", packages });
  }

  /** Run shell commands in order, as root, with network; the first failure fails the build. */
  runCommands(...commands: string[]): Image {
    return this.step({ kind: "run_commands", commands });
  }

  /** Set environment variables for later steps and for every command in its sandboxes. */
  env(variables: Record<string, string>): Image {
    return this.step({ kind: "env", env: { ...variables } });
  }

  /** The working directory of later `runCommands` and of commands in its sandboxes. */
  workdir(path: string): Image {
    return this.step({ kind: "workdir", path });
  }

  /** Copy a file from this machine to `dst` in the image (a `dst` ending in / is a directory). */
  copyLocalFile(src: string, dst: string): Image {
    if (!existsSync(src) || !statSync(src).isFile()) {
      throw new InvalidRequest(`${src} is not a file on this machine`, "file_not_found");
    }
    return this.step({ kind: "copy", src: resolve(src), dst: dst.endsWith("/") ? dst + basename(src) : dst });
  }

  /**
   * Copy a directory's content from this machine into `dst` in the image. `ignore` holds glob
   * patterns matched against each path relative to `src` and each name (`*.pyc`, `.git`).
   */
  copyLocalDir(src: string, dst: string, options: { ignore?: string[] } = {}): Image {
    if (!existsSync(src) || !statSync(src).isDirectory()) {
      throw new InvalidRequest(`${src} is not a directory on this machine`, "file_not_found");
    }
    return this.step({ kind: "copy", src: resolve(src), dst, ignore: [...(options.ignore ?? [])] });
  }

  /** The recipe as the API takes it; local content is named by the digests in `blobs` (by step). */
  recipe(blobs: ReadonlyMap<number, string> = new Map()): { base: Record<string, string>; steps: Step[] } {
    const steps = this.steps.map((step, index) =>
      "src" in step ? { kind: "copy", blob: blobs.get(index) ?? "", dst: step.dst } : { ...step },
    );
    return { base: { ...this.base }, steps };
  }

  /**
   * Build on the server (every cached step is skipped) and return the built image.
   * `ImageBuildFailed` says which step failed (`step`), with the end of its output (`log`).
   */
  async build(options: BuildOptions = {}): Promise<BuiltImage> {
    const client = options.client ?? Client.default();
    const json = { recipe: this.recipe(await this.upload(client)), name: options.name ?? null };
    const response = await client.fetch("POST", "/v1/images", { json, timeout: null });
    for await (const line of lines(response)) {
      if (!line.trim()) continue;
      const event = JSON.parse(line) as Record<string, unknown>;
      if (event.event === "done") return event.image as BuiltImage;
      if (event.event === "error") throw buildFailure(event);
      options.onProgress?.({
        kind: String(event.event),
        step: Number(event.step),
        steps: event.steps as number | undefined,
        description: event.description as string | undefined,
        cached: event.cached as boolean | undefined,
        line: event.line as string | undefined,
      });
    }
    throw new ServiceUnavailable("the server ended the build's stream without a result; retry");
  }

  /** Pack and send the content of each copy step unless the server has it; the digests. */
  private async upload(client: Client): Promise<Map<number, string>> {
    const blobs = new Map<number, string>();
    if (!this.steps.some((step) => "src" in step)) return blobs;
    const temp = await mkdtemp(join(tmpdir(), "corral-image-"));
    try {
      for (const [index, step] of this.steps.entries()) {
        if (!("src" in step)) continue;
        const archive = join(temp, `step-${index}.tar`);
        await pack(String(step.src), String(step.dst), (step.ignore as string[] | undefined) ?? [], archive);
        const digest = await digestOf(archive);
        if (!(await client.exists(`/v1/blobs/${digest}`))) {
          await client.request("PUT", `/v1/blobs/${digest}`, { body: createReadStream(archive), timeout: null });
        }
        blobs.set(index, digest);
      }
    } finally {
      await rm(temp, { recursive: true, force: true });
    }
    return blobs;
  }

  private step(step: Step): Image {
    return new Image(this.base, [...this.steps, step]);
  }
}

function buildFailure(event: Record<string, unknown>): ImageBuildFailed {
  const error = event.error as { code: string; message: string };
  const failed = new ImageBuildFailed(error.message, error.code);
  failed.step = Number(event.step ?? 0);
  failed.log = String(event.log ?? "");
  return failed;
}
