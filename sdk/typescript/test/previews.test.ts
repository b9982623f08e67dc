// Previews through the TypeScript SDK: a server in a sandbox reached by URL with its token,
// refused without it, and closed by revoking.

import assert from "node:assert/strict";
import { test } from "node:test";

import { InvalidRequest } from "../src/index.js";
import { LIMIT, rejection, sandboxFor } from "./helpers.js";

test("expose opens a port to whoever holds the token, until revoked", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  await sandbox.files.write("/srv/index.html", "<h1>hello from the sandbox</h1>");
  await sandbox.run("cd /srv && nohup python3 -m http.server 8000 > /tmp/web.log 2>&1 &");
  const preview = await sandbox.expose(8000);
  assert.equal(preview.port, 8000);
  assert.equal(preview.public, false);
  assert.ok(preview.token && preview.signed_url);
  // By path on the server (its `url` is by host name where a preview domain is set).
  const url = `${process.env.CORRAL_URL}/preview/${sandbox.id}/8000/`;
  let page: Response | undefined;
  for (let i = 0; i < 100; i++) {
    page = await fetch(url, { headers: preview.headers as Record<string, string> });
    if (page.status === 200) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(page?.status, 200);
  assert.equal(await page?.text(), "<h1>hello from the sandbox</h1>");
  const stranger = await fetch(url);
  assert.ok([401, 403].includes(stranger.status), String(stranger.status));
  assert.deepEqual((await sandbox.previews()).map((p) => [p.id, p.token]), [[preview.id, null]]);

  await sandbox.revokePreview(preview);
  const after = await fetch(url, { headers: preview.headers as Record<string, string> });
  assert.ok([401, 403, 404].includes(after.status), String(after.status));
  assert.deepEqual(await sandbox.previews(), []);
  await rejection(sandbox.expose(0), InvalidRequest);
  await rejection(sandbox.expose(70000), InvalidRequest);
});
