/**
 * The files of a sandbox (`sandbox.files`). Paths are absolute paths inside the sandbox,
 * resolved there by its agent; content streams both ways, so a file of any size the sandbox's
 * disk holds can go in or out.
 */

import { createReadStream, createWriteStream } from "node:fs";
import { rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { pipeline } from "node:stream/promises";
import { Readable } from "node:stream";

import { bytes, type Body, type Client } from "./client.js";
import { FileNotFound } from "./errors.js";
import type { FileInfo } from "./types.js";

export class Files {
  private readonly base: string;

  /** @internal */
  constructor(
    private readonly client: Client,
    sandboxId: string,
  ) {
    this.base = `/v1/sandboxes/${sandboxId}/files`;
  }

  /** Write text, bytes, a web stream or an async iterable of bytes (streamed); bytes written. */
  async write(path: string, data: Body, options: { mode?: number; append?: boolean } = {}): Promise<number> {
    const written = await this.client.request<{ bytes: number }>("PUT", `${this.base}/content`, {
      query: { path, append: options.append ?? false, mode: options.mode },
      body: data,
      timeout: null,
    });
    return written.bytes;
  }

  /** The file's content in chunks, as it arrives. */
  async *readStream(path: string): AsyncGenerator<Uint8Array> {
    const response = await this.client.fetch("GET", `${this.base}/content`, { query: { path }, timeout: null });
    if (response.body !== null) yield* response.body as unknown as AsyncIterable<Uint8Array>;
  }

  /** The file's content. */
  async read(path: string): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    for await (const chunk of this.readStream(path)) parts.push(chunk);
    return bytes(parts);
  }

  /** The file's content as text (UTF-8). */
  async readText(path: string): Promise<string> {
    return new TextDecoder().decode(await this.read(path));
  }

  /** Copy a local file into the sandbox, streamed; bytes written. */
  async upload(local: string, remote: string): Promise<number> {
    return this.write(remote, createReadStream(local));
  }

  /** Copy a file out of the sandbox, streamed; the local file appears only when complete. */
  async download(remote: string, local: string): Promise<number> {
    const partial = join(dirname(local), `.${basename(local)}.part`);
    let written = 0;
    const counted = async function* (chunks: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
      for await (const chunk of chunks) {
        written += chunk.length;
        yield chunk;
      }
    };
    try {
      await pipeline(Readable.from(counted(this.readStream(remote))), createWriteStream(partial));
    } catch (error) {
      await rm(partial, { force: true });
      throw error;
    }
    await rename(partial, local);
    return written;
  }

  /** What is in a directory, `depth` levels down. */
  list(path: string, depth = 1): Promise<FileInfo[]> {
    return this.client.request("GET", this.base, { query: { path, depth } });
  }

  /** What is at `path` (`FileNotFound` if nothing is). */
  stat(path: string): Promise<FileInfo> {
    return this.client.request("GET", `${this.base}/stat`, { query: { path } });
  }

  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (error) {
      if (error instanceof FileNotFound) return false;
      throw error;
    }
  }

  mkdir(path: string, options: { parents?: boolean; mode?: number } = {}): Promise<FileInfo> {
    const json = { path, parents: options.parents ?? true, mode: options.mode ?? 0o755 };
    return this.client.request("POST", `${this.base}/mkdir`, { json });
  }

  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await this.client.request("DELETE", this.base, { query: { path, recursive: options.recursive ?? false } });
  }

  rename(src: string, dst: string, options: { overwrite?: boolean } = {}): Promise<FileInfo> {
    const json = { src, dst, overwrite: options.overwrite ?? false };
    return this.client.request("POST", `${this.base}/rename`, { json });
  }

  chmod(path: string, mode: number): Promise<FileInfo> {
    return this.client.request("POST", `${this.base}/chmod`, { json: { path, mode } });
  }
}
