// A sandbox's files through the TypeScript SDK: content both ways (streamed, binary-safe,
// large), the directory operations, and the errors for paths that cannot be used.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { FileExists, FileNotFound, InvalidPath } from "../src/index.js";
import { LIMIT, rejection, sandboxFor } from "./helpers.js";

test("text and bytes go in and come out the same", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  assert.equal(await sandbox.files.write("/root/hello.txt", "héllo\n"), 7);
  assert.equal(await sandbox.files.readText("/root/hello.txt"), "héllo\n");
  const every = new Uint8Array(256).map((_, i) => i);
  await sandbox.files.write("/root/bytes.bin", every, { mode: 0o600 });
  assert.deepEqual(await sandbox.files.read("/root/bytes.bin"), every);
  assert.equal((await sandbox.files.stat("/root/bytes.bin")).mode & 0o777, 0o600);
  await sandbox.files.write("/root/hello.txt", "again\n", { append: true });
  assert.equal((await sandbox.run("cat /root/hello.txt")).stdout, "héllo\nagain\n");
});

test("large files stream in and out through local files", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const local = await mkdtemp(join(tmpdir(), "corral-ts-files-"));
  t.after(() => rm(local, { recursive: true, force: true }));
  const content = randomBytes(6 * 1024 * 1024 + 7);
  await writeFile(join(local, "in.bin"), content);
  assert.equal(await sandbox.files.upload(join(local, "in.bin"), "/root/big.bin"), content.length);
  const sum = (await sandbox.run("sha256sum /root/big.bin")).stdout.split(" ")[0];
  const { createHash } = await import("node:crypto");
  assert.equal(sum, createHash("sha256").update(content).digest("hex"));
  assert.equal(await sandbox.files.download("/root/big.bin", join(local, "out.bin")), content.length);
  assert.ok((await readFile(join(local, "out.bin"))).equals(content));
  // A failed download leaves nothing behind, not even its partial file.
  await rejection(sandbox.files.download("/root/missing.bin", join(local, "none.bin")), FileNotFound);
  assert.deepEqual((await readdir(local)).sort(), ["in.bin", "out.bin"]);
  // An async iterable is streamed too.
  async function* parts(): AsyncGenerator<Uint8Array> {
    for (let i = 0; i < 3; i++) yield new TextEncoder().encode(`part ${i}\n`);
  }
  assert.equal(await sandbox.files.write("/root/parts.txt", parts()), 21);
  assert.equal(await sandbox.files.readText("/root/parts.txt"), "part 0\npart 1\npart 2\n");
});

test("directories: mkdir, list, rename, chmod, remove", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const made = await sandbox.files.mkdir("/root/a/b/c");
  assert.equal(made.type, "dir");
  await sandbox.files.write("/root/a/b/c/x.txt", "x");
  const listed = await sandbox.files.list("/root/a", 3);
  assert.deepEqual(listed.map((f) => f.path).sort(), ["/root/a/b", "/root/a/b/c", "/root/a/b/c/x.txt"]);
  const moved = await sandbox.files.rename("/root/a/b/c/x.txt", "/root/a/y.txt");
  assert.equal(moved.path, "/root/a/y.txt");
  await sandbox.files.write("/root/a/z.txt", "z");
  await rejection(sandbox.files.rename("/root/a/y.txt", "/root/a/z.txt"), FileExists, "file_exists");
  assert.equal((await sandbox.files.chmod("/root/a/y.txt", 0o640)).mode & 0o777, 0o640);
  assert.equal(await sandbox.files.exists("/root/a/y.txt"), true);
  await rejection(sandbox.files.remove("/root/a"), FileExists);
  await sandbox.files.remove("/root/a", { recursive: true });
  assert.equal(await sandbox.files.exists("/root/a"), false);
});

test("paths that cannot be used are refused with what to do", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const missing = await rejection(sandbox.files.readText("/root/nothing.txt"), FileNotFound, "file_not_found");
  assert.match(missing.message, /nothing\.txt/);
  const relative = await rejection(sandbox.files.write("root/x.txt", "x"), InvalidPath, "invalid_path");
  assert.equal(relative.status, 400);
  await rejection(sandbox.files.write("/root/a\u0000b", "x"), InvalidPath);
  await rejection(sandbox.files.list("/root/x".padEnd(5000, "x")), InvalidPath);
  // A symlink to a path on the host leads to the sandbox's own files, never the host's.
  const local = await mkdtemp(join(tmpdir(), "corral-ts-host-"));
  t.after(() => rm(local, { recursive: true, force: true }));
  await writeFile(join(local, "secret"), "host only");
  await sandbox.run(["ln", "-s", join(local, "secret"), "/root/link"]);
  await rejection(sandbox.files.readText("/root/link"), FileNotFound);
  await rejection(sandbox.files.readText(join(local, "secret")), FileNotFound);
});
