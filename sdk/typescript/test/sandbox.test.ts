// Sandboxes through the TypeScript SDK: create, run, list, info, lifetime, and the errors a
// caller gets for bad input.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  AuthError,
  Client,
  CommandTimeout,
  ConnectionFailed,
  CorralError,
  type CreateOptions,
  InvalidRequest,
  InvalidState,
  NotFound,
  RuntimeUnavailable,
  Sandbox,
  SandboxNotFound,
} from "../src/index.js";
import { LIMIT, rejection, runtimes, sandboxFor } from "./helpers.js";

for (const runtime of runtimes) {
  test(`a ${runtime} sandbox runs shell commands and argvs`, LIMIT, async (t) => {
    const sandbox = await sandboxFor(t, { runtime, env: { GREETING: "hello" }, metadata: { suite: "ts" } });
    assert.equal(sandbox.state, "running");
    assert.match(sandbox.id, /^sb-[0-9a-z]{16}$/);
    const shell = await sandbox.run("echo $GREETING; echo oops >&2; exit 3");
    assert.deepEqual(
      [shell.exitCode, shell.stdout, shell.stderr, shell.timedOut],
      [3, "hello\n", "oops\n", false],
    );
    const argv = await sandbox.run(["python3", "-c", "import os, sys; print(os.getcwd(), sys.argv[1:])", "$HOME"], {
      cwd: "/tmp",
      env: { EXTRA: "1" },
    });
    assert.equal(argv.stdout, "/tmp ['$HOME']\n");
    const input = await sandbox.run("tr a-z A-Z", { stdin: "quiet\n" });
    assert.equal(input.stdout, "QUIET\n");
    const info = await sandbox.info();
    assert.equal(info.runtime, runtime);
    assert.deepEqual(info.spec.metadata, { suite: "ts" });
  });
}

test("a command past its timeout throws CommandTimeout with what it printed", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const error = await rejection(sandbox.run("echo started; sleep 30", { timeout: 1 }), CommandTimeout, "command_timeout");
  const result = error.result!;
  assert.equal(result.stdout, "started\n");
  assert.equal(result.timedOut, true);
});

test("list filters by metadata and state; connect finds a sandbox by id", LIMIT, async (t) => {
  const tag = `t${Date.now()}`;
  const sandbox = await sandboxFor(t, { metadata: { tag } });
  const found = await Sandbox.list({ metadata: { tag } });
  assert.deepEqual(found.map((info) => info.id), [sandbox.id]);
  assert.deepEqual(await Sandbox.list({ metadata: { tag }, state: "paused" }), []);
  const again = await Sandbox.connect(sandbox.id);
  assert.equal((await again.run("echo same")).stdout, "same\n");
  const extended = await sandbox.setTimeout(600);
  assert.ok((extended.expires_at ?? 0) > Date.now() / 1000 + 500);
});

test("a terminated sandbox says so, and its end is final", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const ended = await sandbox.terminate();
  assert.equal(ended.state, "terminated");
  assert.equal(sandbox.state, "terminated");
  await rejection(sandbox.run("true"), InvalidState, "invalid_state");
});

test("await using terminates the sandbox when the block ends", LIMIT, async () => {
  let id;
  {
    await using sandbox = await Sandbox.create({ runtime: "namespaces" });
    id = sandbox.id;
    assert.equal((await sandbox.run("echo in")).stdout, "in\n");
  }
  const [info] = await Sandbox.list({ state: "terminated" }).then((all) => all.filter((s) => s.id === id));
  assert.equal(info?.state, "terminated");
});

test("bad input gets a clear error with a stable code, and nothing is made", LIMIT, async () => {
  const tag = `bad${Date.now()}`;
  const cases: [CreateOptions, typeof CorralError, string, RegExp][] = [
    [{ memoryMb: 1 }, InvalidRequest, "invalid_request", /memory/],
    [{ cpu: -1 }, InvalidRequest, "invalid_request", /cpu/],
    [{ runtime: "vmware" }, RuntimeUnavailable, "unknown_runtime", /gvisor, namespaces/],
    [{ network: "everywhere" as "none" }, InvalidRequest, "invalid_request", /network/],
    [{ image: "no-such-image" }, CorralError, "image_not_found", /no-such-image/],
    [{ timeout: 0 }, InvalidRequest, "invalid_request", /timeout/],
  ];
  for (const [options, cls, code, says] of cases) {
    const error = await rejection(Sandbox.create({ ...options, metadata: { tag } }), cls, code);
    assert.match(error.message, says, JSON.stringify(options));
    assert.ok(error.status >= 400 && error.status < 500, `${error.status} for ${JSON.stringify(options)}`);
  }
  assert.deepEqual(await Sandbox.list({ metadata: { tag } }), []);
});

test("ids that are not ids, and ids of nothing, are told apart", LIMIT, async () => {
  await rejection(Sandbox.connect("sb-0000000000000000"), SandboxNotFound, "sandbox_not_found");
  const error = await rejection(Sandbox.connect("sb-NOT_AN_ID"), InvalidRequest, "invalid_id");
  assert.equal(error.status, 400);
  // An id is one path segment: "../keys" cannot turn a sandbox lookup into a list of keys.
  await rejection(Sandbox.connect("../keys"), NotFound, "not_found");
  await rejection(Sandbox.connect("../../v1/keys"), NotFound, "not_found");
});

test("a missing or wrong key, and an unreachable server, are errors that say what to do", LIMIT, async () => {
  const noKey = new Client({ url: process.env.CORRAL_URL, apiKey: "" });
  const missing = await rejection(Sandbox.create({ client: noKey }), AuthError, "unauthorized");
  assert.match(missing.message, /CORRAL_API_KEY/);
  const wrong = new Client({ url: process.env.CORRAL_URL, apiKey: "corral_not_a_real_key" });
  const refused = await rejection(Sandbox.list({ client: wrong }), AuthError, "unauthorized");
  assert.equal(refused.status, 401);
  const nowhere = new Client({ url: "http://127.0.0.1:9", apiKey: "corral_x" });
  const down = await rejection(Sandbox.list({ client: nowhere }), ConnectionFailed, "connection_failed");
  assert.match(down.message, /corral serve/);
  assert.throws(() => new Client({ url: "ftp://example.com", apiKey: "x" }), /http/);
});
