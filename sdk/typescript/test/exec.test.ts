// Streamed processes through the TypeScript SDK: output as it happens, stdin, terminals,
// signals, callbacks and the stream's errors.

import assert from "node:assert/strict";
import { test } from "node:test";

import { InvalidRequest } from "../src/index.js";
import { LIMIT, rejection, runtimes, sandboxFor } from "./helpers.js";

const decode = (chunk: Uint8Array): string => new TextDecoder().decode(chunk);

for (const runtime of runtimes) {
  test(`${runtime}: output streams as it happens, stdin reaches the process`, LIMIT, async (t) => {
    const sandbox = await sandboxFor(t, { runtime });
    const ticking = await sandbox.exec("for i in 1 2 3; do echo $i; sleep 0.2; done; echo done >&2");
    const seen: string[] = [];
    const started = Date.now();
    const times: number[] = [];
    for await (const chunk of ticking.stdout) {
      seen.push(decode(chunk));
      times.push(Date.now() - started);
    }
    assert.equal(seen.join(""), "1\n2\n3\n");
    assert.ok(times.length >= 2 && times.at(-1)! - times[0]! >= 300, `chunks came together: ${times.join(", ")}`);
    assert.equal(await ticking.stderr.text(), "done\n");
    assert.equal(await ticking.wait(), 0);

    const reverse = await sandbox.exec(["python3", "-c", "import sys; print(sys.stdin.read()[::-1])"], { stdin: true });
    await reverse.stdin.write("olleh");
    await reverse.stdin.write(new Uint8Array([0x21]));
    await reverse.stdin.close();
    assert.equal(await reverse.stdout.text(), "!hello\n");
    assert.deepEqual(await reverse.result(), { exitCode: 0, signal: null, timedOut: false, oomKilled: false });
  });
}

test("a terminal has the size asked for, and resizes", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const shell = await sandbox.exec(["bash", "--norc", "-i"], { pty: [30, 100], stdin: true });
  const output: string[] = [];
  const reading = (async () => {
    for await (const chunk of shell.stdout) output.push(decode(chunk));
  })();
  const until = async (text: string): Promise<void> => {
    for (let i = 0; i < 300 && !output.join("").includes(text); i++) await new Promise((r) => setTimeout(r, 50));
    assert.ok(output.join("").includes(text), `no ${JSON.stringify(text)} in ${JSON.stringify(output.join(""))}`);
  };
  await until("# ");
  await shell.stdin.write("stty size\n");
  await until("30 100");
  await shell.resize(40, 120);
  await shell.stdin.write("stty size; exit 7\n");
  await until("40 120");
  assert.equal(await shell.wait(), 7);
  await reading;
});

test("signals and kill end a process; close hangs up and the process ends", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const sleeper = await sandbox.exec(["sleep", "600"]);
  await sleeper.signal("SIGTERM");
  const ended = await sleeper.result();
  assert.equal(ended.signal, 15);
  assert.equal(await sleeper.wait(), 143);

  const stubborn = await sandbox.exec("trap '' TERM; sleep 600");
  await stubborn.kill();
  assert.equal(await stubborn.wait(), 137);

  const left = await sandbox.exec(["sleep", "601"]);
  await left.close();
  for (let i = 0; i < 100; i++) {
    const running = (await sandbox.processes()).filter((p) => p.running && p.argv.join(" ") === "sleep 601");
    if (running.length === 0) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail("the process of a closed stream is still running");
});

test("callbacks get each chunk instead of the streams", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const out: string[] = [];
  const err: string[] = [];
  const process = await sandbox.exec("echo one; echo two >&2", {
    onStdout: (chunk) => void out.push(decode(chunk)),
    onStderr: async (chunk) => void err.push(decode(chunk)),
  });
  assert.equal(await process.wait(), 0);
  assert.deepEqual([out.join(""), err.join("")], ["one\n", "two\n"]);
  assert.equal(await process.stdout.text(), "");
});

test("a process that cannot start is an error, and the sandbox goes on", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  await rejection(sandbox.exec(["/no/such/program"]), InvalidRequest, "command_not_found");
  await rejection(sandbox.exec(["true"], { cwd: "/no/such/dir" }), InvalidRequest, "invalid_cwd");
  await rejection(sandbox.exec(["true"], { user: "nobody-here" }), InvalidRequest, "invalid_user");
  const fine = await sandbox.exec(["echo", "fine"]);
  assert.equal(await fine.stdout.text(), "fine\n");
});

test("processes lists what ran; killAll ends everything but the agent", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  await sandbox.exec(["sleep", "600"]);
  await sandbox.exec(["sleep", "601"]);
  const running = (await sandbox.processes()).filter((p) => p.running);
  assert.ok(running.length >= 2, JSON.stringify(running));
  assert.ok((await sandbox.killAll()) >= 2);
  assert.equal((await sandbox.run("echo still here")).stdout, "still here\n");
});
