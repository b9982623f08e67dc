/**
 * Local files for an image's `copy` steps, packed as a tar the way the Python SDK packs them:
 * names sorted, owner root, times zeroed, so the same content gives the same bytes, the same
 * digest, and a cache hit on the server however often the files were touched.
 */

import { createHash } from "node:crypto";
import { createReadStream, createWriteStream, type WriteStream } from "node:fs";
import { lstat, readdir, readlink } from "node:fs/promises";
import { join, posix, relative, sep } from "node:path";

const BLOCK = 512;

/** Pack `src` (a file, or a directory's content) into the tar file `out`, placed at `dst`. */
export async function pack(src: string, dst: string, ignore: readonly string[], out: string): Promise<void> {
  const tar = new TarWriter(createWriteStream(out));
  const target = dst.replace(/^\/+/, "") || ".";
  const info = await lstat(src);
  if (info.isFile()) {
    await tar.add(src, target);
  } else {
    if (target !== ".") await tar.add(src, target);
    const patterns = ignore.map(globToRegExp);
    for await (const path of walk(src, src, patterns)) {
      await tar.add(path, posix.join(target, relative(src, path).split(sep).join("/")));
    }
  }
  await tar.finish();
}

/** The sha256 of a file, as "sha256:<hex>". */
export async function digestOf(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return `sha256:${hash.digest("hex")}`;
}

async function* walk(root: string, directory: string, ignore: RegExp[]): AsyncGenerator<string> {
  const entries = (await readdir(directory, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const entry of entries) {
    const path = join(directory, entry.name);
    const rel = relative(root, path).split(sep).join("/");
    if (ignore.some((pattern) => pattern.test(rel) || pattern.test(entry.name))) continue;
    yield path;
    if (entry.isDirectory()) yield* walk(root, path, ignore);
  }
}

/** A shell-style glob (`*`, `?`, `[...]`, as Python's fnmatch) as a regular expression. */
export function globToRegExp(glob: string): RegExp {
  let source = "";
  for (let i = 0; i < glob.length; i++) {
    const char = glob[i]!;
    if (char === "*") source += ".*";
    else if (char === "?") source += ".";
    else if (char === "[" && glob.indexOf("]", i + 2) > 0) {
      const end = glob.indexOf("]", i + 2);
      let set = glob.slice(i + 1, end).replace(/\\/g, "\\\\");
      if (set.startsWith("!")) set = "^" + set.slice(1);
      source += `[${set}]`;
      i = end;
    } else source += char.replace(/[.+^${}()|\\\]]/g, "\\$&");
  }
  return new RegExp(`^${source}$`, "s");
}

class TarWriter {
  constructor(private readonly out: WriteStream) {}

  /** Add what is at `path` under `name`: a file, a directory or a symlink; nothing else is content. */
  async add(path: string, name: string): Promise<void> {
    const info = await lstat(path);
    const mode = info.mode & 0o7777;
    if (info.isFile()) {
      await this.header(name, mode, "0", info.size, "");
      let written = 0;
      for await (const chunk of createReadStream(path)) {
        written += (chunk as Buffer).length;
        await this.write(chunk as Buffer);
      }
      if (written !== info.size) throw new Error(`${path} changed while it was being packed`);
      await this.write(Buffer.alloc((BLOCK - (info.size % BLOCK)) % BLOCK));
    } else if (info.isDirectory()) {
      await this.header(name, mode, "5", 0, "");
    } else if (info.isSymbolicLink()) {
      await this.header(name, mode, "2", 0, await readlink(path));
    }
  }

  async finish(): Promise<void> {
    await this.write(Buffer.alloc(2 * BLOCK));
    await new Promise<void>((resolve, reject) => {
      this.out.on("error", reject);
      this.out.end(resolve);
    });
  }

  private async header(name: string, mode: number, type: string, size: number, link: string): Promise<void> {
    const long = Buffer.byteLength(name) > 99 || Buffer.byteLength(link) > 99 || size > 0o77777777777;
    if (long) {
      // A pax extended header carries what ustar's fields cannot hold.
      let records = record("path", name) + (link ? record("linkpath", link) : "");
      if (size > 0o77777777777) records += record("size", String(size));
      const data = Buffer.from(records);
      await this.write(block("././@PaxHeader", 0o644, "x", data.length, ""));
      await this.write(Buffer.concat([data, Buffer.alloc((BLOCK - (data.length % BLOCK)) % BLOCK)]));
    }
    await this.write(block(long ? name.slice(0, 99) : name, mode, type, size > 0o77777777777 ? 0 : size, long ? "" : link));
  }

  private write(data: Buffer): Promise<void> {
    return new Promise<void>((resolve, reject) => this.out.write(data, (error) => (error ? reject(error) : resolve())));
  }
}

function record(key: string, value: string): string {
  // A record's length counts the digits that write it.
  const body = ` ${key}=${value}\n`;
  const bytes = Buffer.byteLength(body);
  let length = bytes + 1;
  while (length !== bytes + String(length).length) length = bytes + String(length).length;
  return `${length}${body}`;
}

function block(name: string, mode: number, type: string, size: number, link: string): Buffer {
  const header = Buffer.alloc(BLOCK);
  header.write(name, 0, 100);
  header.write(octal(mode, 8), 100);
  header.write(octal(0, 8), 108); // uid
  header.write(octal(0, 8), 116); // gid
  header.write(octal(size, 12), 124);
  header.write(octal(0, 12), 136); // mtime
  header.write("        ", 148); // the checksum counts itself as spaces
  header.write(type, 156);
  header.write(link, 157, 100);
  header.write("ustar\u000000", 257);
  header.write("root", 265);
  header.write("root", 297);
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(`${sum.toString(8).padStart(6, "0")}\u0000 `, 148);
  return header;
}

function octal(value: number, width: number): string {
  return `${value.toString(8).padStart(width - 1, "0")}\u0000`;
}
