// Pause, hibernate, snapshots and forks through the TypeScript SDK (gVisor for memory).

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client, InvalidState, Sandbox } from "../src/index.js";
import { LIMIT, needsGvisor, rejection, sandboxFor } from "./helpers.js";

test("pause freezes and resume thaws; any use resumes", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  await sandbox.runCode("counter = 41");
  assert.equal((await sandbox.pause()).state, "paused");
  assert.equal(sandbox.state, "paused");
  await rejection(sandbox.pause(), InvalidState, "invalid_state");
  assert.equal((await sandbox.resume()).state, "running");
  await sandbox.pause();
  const again = await Sandbox.connect(sandbox.id); // auto-resumes
  assert.equal(again.state, "running");
  assert.equal((await again.runCode("counter + 1")).text, "42");
});

test("a hibernated gVisor sandbox wakes with its memory and processes", LIMIT, async (t) => {
  if (needsGvisor(t)) return;
  const sandbox = await sandboxFor(t, { runtime: "gvisor" });
  await sandbox.runCode("memory = [i * i for i in range(1000)]");
  const sleeper = await sandbox.exec(["sleep", "600"]);
  assert.equal((await sandbox.hibernate()).state, "hibernated");
  await assert.rejects(sleeper.wait()); // the stream ends with the hibernation
  assert.equal((await sandbox.wake()).state, "running");
  assert.equal((await sandbox.runCode("sum(memory)")).text, "332833500");
  const sleeping = (await sandbox.processes()).filter((p) => p.running && p.argv[0] === "sleep");
  assert.equal(sleeping.length, 1);
});

test("snapshots start new sandboxes where the old one was; forks diverge", LIMIT, async (t) => {
  if (needsGvisor(t)) return;
  const sandbox = await sandboxFor(t, { runtime: "gvisor" });
  await sandbox.runCode("value = 'before'");
  await sandbox.files.write("/root/state.txt", "saved");
  const name = `ts-${Date.now()}`;
  const snapshot = await sandbox.snapshot({ name });
  assert.equal(snapshot.sandbox_id, sandbox.id);
  assert.equal((await new Client().getSnapshot(name)).id, snapshot.id);
  await sandbox.runCode("value = 'after'");

  const copy = await Sandbox.create({ snapshot: name });
  t.after(() => copy.terminate().catch(() => undefined));
  assert.equal((await copy.runCode("value")).text, "'before'");
  assert.equal(await copy.files.readText("/root/state.txt"), "saved");

  const forks = await sandbox.fork(2);
  t.after(() => Promise.all(forks.map((f) => f.terminate().catch(() => undefined))));
  assert.equal(forks.length, 2);
  await forks[0]!.runCode("value = 'fork 0'");
  assert.deepEqual(
    await Promise.all([sandbox, ...forks].map(async (s) => (await s.runCode("value")).text)),
    ["'after'", "'fork 0'", "'after'"],
  );
  await new Client().deleteSnapshot(snapshot.id);
  assert.equal((await new Client().listSnapshots()).some((s) => s.id === snapshot.id), false);
});

test("a filesystem snapshot is an image that new sandboxes start from", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  await sandbox.files.write("/opt/made-here.txt", "kept\n");
  const image = await sandbox.snapshotFilesystem({ name: `fs-${Date.now()}` });
  t.after(() => new Client().removeImage(image.id).catch(() => undefined));
  const started = await sandboxFor(t, { image });
  assert.equal(await started.files.readText("/opt/made-here.txt"), "kept\n");
});
