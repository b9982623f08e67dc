// Volumes through the TypeScript SDK: shared between sandboxes, read-only mounts, and the
// errors for names and volumes in use.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Conflict, InvalidRequest, PermissionDenied, Sandbox, Volume, VolumeInUse, VolumeNotFound } from "../src/index.js";
import { LIMIT, rejection, sandboxFor } from "./helpers.js";

const fresh = (): string => `ts-vol-${process.pid}-${Date.now()}`;

test("a volume outlives its sandboxes and mounts read-only", LIMIT, async (t) => {
  const name = fresh();
  const volume = await Volume.create(name, { sizeMb: 32 });
  t.after(() => volume.delete().catch(() => undefined));
  assert.equal(volume.sizeMb, 32);
  assert.equal((await Volume.fromName(name)).id, volume.id);
  assert.ok((await Volume.list()).some((v) => v.id === volume.id));

  const writer = await sandboxFor(t, { volumes: { "/data": volume } });
  await writer.files.write("/data/note.txt", "kept\n");
  assert.deepEqual((await volume.refresh()).sandboxes, [writer.id]);
  await rejection(volume.delete(), VolumeInUse, "volume_in_use");
  await writer.terminate();

  const reader = await sandboxFor(t, { volumes: { "/ref": volume.readOnly() } });
  assert.equal(await reader.files.readText("/ref/note.txt"), "kept\n");
  await rejection(reader.files.write("/ref/new.txt", "x"), PermissionDenied);
  const refused = await reader.run("echo x > /ref/new.txt");
  assert.match(refused.stderr, /Read-only file system/);
  await reader.terminate();
  await volume.delete();
  await rejection(Volume.fromName(name), VolumeNotFound, "volume_not_found");
});

test("fromName makes a missing volume only when asked; names are checked", LIMIT, async () => {
  const name = fresh();
  await rejection(Volume.fromName(name), VolumeNotFound);
  const made = await Volume.fromName(name, { createIfMissing: true, sizeMb: 16 });
  try {
    assert.equal((await Volume.fromName(name, { createIfMissing: true })).id, made.id);
    await rejection(Volume.create(name), Conflict, "volume_exists");
  } finally {
    await made.delete();
  }
  const escape = await rejection(Volume.create("../escape"), InvalidRequest, "invalid_request");
  assert.match(escape.message, /cannot name a volume/);
  const empty = await rejection(Volume.create(fresh(), { sizeMb: 0 }), InvalidRequest, "invalid_request");
  assert.match(empty.message, /16 to \d+ MiB/);
  const missing = await rejection(Sandbox.create({ volumes: { "/data": "no-such-volume" } }), VolumeNotFound);
  assert.match(missing.message, /no volume 'no-such-volume'/);
});
