// What a client can watch through the TypeScript SDK: state changes as they happen, usage
// samples, and the images, snapshots and network rules of its sandboxes.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client, CorralError, ImageNotFound, InvalidRequest } from "../src/index.js";
import { LIMIT, rejection, sandboxFor } from "./helpers.js";

test("events arrive as they happen; metrics are sampled", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const seen: string[] = [];
  const watching = (async () => {
    for await (const event of new Client().events(sandbox.id)) {
      seen.push(String(event.state));
      if (event.state === "running" && seen.includes("paused")) return;
    }
  })();
  await new Promise((r) => setTimeout(r, 300)); // subscribed before the changes
  await sandbox.pause();
  await sandbox.resume();
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`saw ${seen.join(", ")}`)), 30_000)));
  await Promise.race([watching, late]).finally(() => clearTimeout(timer));
  assert.deepEqual(seen.slice(-2), ["paused", "running"]);

  await sandbox.run("python3 -c 'x = bytearray(64 << 20); import time; time.sleep(6)'");
  let samples = await sandbox.metrics();
  for (let i = 0; i < 60 && samples.length === 0; i++) {
    await new Promise((r) => setTimeout(r, 500));
    samples = await sandbox.metrics();
  }
  assert.ok(samples.length > 0, "no usage sample in 30 s");
  assert.ok(samples.every((s) => typeof s.memory_bytes === "number" && typeof s.cpu_percent === "number"));
});

test("images, snapshots and network rules are read and refused clearly", LIMIT, async (t) => {
  const client = new Client();
  assert.ok(Array.isArray(await client.listImages()));
  await rejection(client.getImage("no-such-image"), ImageNotFound, "image_not_found");
  await rejection(client.getSnapshot("no-such-snapshot"), CorralError, "snapshot_not_found");
  const sandbox = await sandboxFor(t);
  const refused = await rejection(sandbox.setNetwork({ allow: ["pypi.org"] }), InvalidRequest, "invalid_network_rule");
  assert.match(refused.message, /network='internet'/);
  const internet = await sandboxFor(t, { network: { allow: ["pypi.org"] } });
  assert.equal(internet.state, "running");
  const changed = await internet.setNetwork({ allow: ["pypi.org", "*.pythonhosted.org"], deny: ["10.0.0.0/8"] });
  assert.deepEqual(changed.spec.egress?.allow, ["pypi.org", "*.pythonhosted.org"]);
  await rejection(internet.setNetwork({ allow: ["not a host name!"] }), InvalidRequest);
});
