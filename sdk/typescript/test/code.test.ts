// The code interpreter through the TypeScript SDK: state kept between calls, callbacks in
// order, errors as data, contexts, and requests that cannot run.

import assert from "node:assert/strict";
import { test } from "node:test";

import { ContextNotFound, InvalidRequest, Result, UnsupportedLanguage } from "../src/index.js";
import { LIMIT, rejection, runtimes, sandboxFor } from "./helpers.js";

for (const runtime of runtimes) {
  test(`${runtime}: runCode keeps state and streams to callbacks in order`, LIMIT, async (t) => {
    const sandbox = await sandboxFor(t, { runtime });
    assert.equal((await sandbox.runCode("x = 6")).error, undefined);
    const seen: [string, unknown][] = [];
    const done = await sandbox.runCode("print('start')\ndisplay(x)\nraise ValueError(f'x is {x}')", {
      onStdout: (text) => void seen.push(["stdout", text]),
      onResult: (result) => void seen.push(["result", result.text]),
      onError: async (error) => void seen.push(["error", error.name]),
    });
    assert.deepEqual(seen, [["stdout", "start\n"], ["result", "6"], ["error", "ValueError"]]);
    assert.equal(done.error?.value, "x is 6");
    assert.match(done.error?.traceback ?? "", /ValueError/);
    const answer = await sandbox.runCode("x * 7");
    assert.equal(answer.text, "42");
    assert.equal(answer.executionCount, 3);
    assert.ok(answer.results[0] instanceof Result);
    assert.deepEqual(answer.results[0]?.formats(), ["text/plain"]);
    const contexts = await sandbox.listCodeContexts();
    assert.deepEqual(contexts.map((c) => [c.id, c.language, c.execution_count]), [["python", "python", 3]]);
  });
}

test("contexts are separate interpreters; restart forgets, remove ends", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const other = await sandbox.createCodeContext({ cwd: "/tmp", env: { WHO: "other" } });
  await sandbox.runCode("y = 1");
  await sandbox.runCode("y = 2", { context: other });
  assert.equal((await sandbox.runCode("y")).text, "1");
  assert.equal((await sandbox.runCode("import os; (y, os.getcwd(), os.environ['WHO'])", { context: other.id })).text, "(2, '/tmp', 'other')");
  await sandbox.restartCodeContext(other);
  const gone = await sandbox.runCode("y", { context: other });
  assert.equal(gone.error?.name, "NameError");
  await sandbox.removeCodeContext(other);
  await rejection(sandbox.runCode("1", { context: other }), ContextNotFound, "context_not_found");
  assert.deepEqual((await sandbox.listCodeContexts()).map((c) => c.id), ["python"]);
});

test("javascript and bash run too; a timeout interrupts and keeps the variables", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const bash = await sandbox.runCode("echo $((6*7))", { language: "bash" });
  assert.deepEqual(bash.logs.stdout, ["42\n"]);
  await sandbox.runCode("kept = 'yes'");
  const slow = await sandbox.runCode("import time; time.sleep(30)", { timeout: 1 });
  assert.equal(slow.timedOut, true);
  assert.ok(slow.error !== undefined);
  assert.equal((await sandbox.runCode("kept")).text, "'yes'");
});

test("requests that cannot run are errors, and nothing is lost", LIMIT, async (t) => {
  const sandbox = await sandboxFor(t);
  const cobol = await rejection(sandbox.runCode("1", { language: "cobol" }), UnsupportedLanguage, "unsupported_language");
  assert.match(cobol.message, /python/);
  await rejection(sandbox.runCode("1", { context: "nope" }), ContextNotFound);
  await rejection(sandbox.runCode("1", { context: "../x" }), InvalidRequest, "invalid_context");
  await rejection(sandbox.runCode("1", { timeout: 0 }), InvalidRequest, "invalid_request");
  await rejection(sandbox.runCode("a\u0000b"), InvalidRequest, "invalid_request");
  await rejection(sandbox.createCodeContext({ language: "ruby" }), UnsupportedLanguage);
  assert.equal((await sandbox.runCode("'fine'")).executionCount, 1);
});
