// A code interpreter's kernel for JavaScript: one Node process per code context, run by the
// guest agent, speaking the same JSON lines as kernel.py (see there) on the two descriptors
// it is given. Cells run in one persistent REPL context (Node's own evaluator: declarations
// last across cells, top-level await works); the value of the last expression is the main
// result. SIGINT interrupts the running cell and keeps the context.
//
// Usage: node kernel.js CONTROL_IN_FD CONTROL_OUT_FD
"use strict";

const fs = require("fs");
const repl = require("repl");
const stream = require("stream");
const util = require("util");
const vm = require("vm");
const { Console } = require("console");

const [inFd, outFd] = process.argv.slice(2).map(Number);
let count = 0;
let pendingText = [];

function writeAll(data) {
  let offset = 0;
  while (offset < data.length) {
    try {
      offset += fs.writeSync(outFd, data, offset);
    } catch (error) {
      if (error.code !== "EAGAIN") throw error;
    }
  }
}

function send(message) {
  const lines = pendingText.map(([type, text]) => JSON.stringify({ type, text }) + "\n");
  pendingText = [];
  if (message) lines.push(JSON.stringify(message) + "\n");
  if (lines.length) writeAll(Buffer.from(lines.join("")));
}

function printer(type) {
  return new stream.Writable({
    write(chunk, _encoding, done) {
      const text = chunk.toString();
      const last = pendingText[pendingText.length - 1];
      if (last && last[0] === type) last[1] += text;
      else pendingText.push([type, text]);
      if (text.includes("\n")) send(null);
      done();
    },
  });
}

const out = printer("stdout");
const err = printer("stderr");
const server = repl.start({
  input: new stream.PassThrough(),
  output: new stream.Writable({ write: (_chunk, _encoding, done) => done() }), // unread
  terminal: false,
  prompt: "",

});
server.context.console = new Console({ stdout: out, stderr: err, colorMode: false });
server.context.display = (value) => send(result(value, false));
let interrupt = null; // ends the running cell early: awaited work cannot be broken into
let failed = null; // ends the running cell with its error
process.on("SIGINT", () => {
  if (interrupt) interrupt();
});
// The REPL reports a cell's error to its domain, not to the eval's callback; an error thrown
// later, by a timer the cell left, is printed on stderr.
server._domain.on("error", (error) => {
  if (failed) failed(error);
  else pendingText.push(["stderr", String((error && error.stack) || error) + "\n"]);
});

function result(value, main) {
  const data = { "text/plain": util.inspect(value, { colors: false, depth: 4 }) };
  if (value !== null && typeof value === "object" && !(value instanceof Error)) {
    try {
      data["application/json"] = JSON.parse(JSON.stringify(value));
    } catch (_error) {
      // not JSON (a cycle, a BigInt): text only
    }
  }
  return { type: "result", data, is_main_result: main };
}

function failure(error) {
  if (error === null || typeof error !== "object") { // a thrown string, or number
    return { type: "error", name: "Error", value: String(error), traceback: String(error) };
  }
  const name = error.name || "Error";
  const interrupted = error.code === "ERR_SCRIPT_EXECUTION_INTERRUPTED";
  return {
    type: "error",
    name: interrupted ? "KeyboardInterrupt" : name,
    value: String(error.message),
    traceback: ownFrames(String(error.stack || `${name}: ${error.message}`)),
  };
}

// A stack without the frames of Node's REPL and of this kernel: the cell's own, as Python's.
function ownFrames(stack) {
  const lines = stack.split("\n");
  const frame = /^\s+at /;
  return lines.filter((line) => !frame.test(line) || line.includes("cell-")).join("\n") + "\n";
}

function run(code) {
  count += 1;
  return new Promise((resolve) => {
    let over = false;
    const finish = (message) => {
      if (over) return;
      over = true;
      interrupt = failed = null;
      if (message) send(message);
      resolve();
    };
    interrupt = () =>
      finish({ type: "error", name: "KeyboardInterrupt", value: "interrupted", traceback: "" });
    failed = (error) => finish(failure(error));
    const done = (value) => finish(value === undefined ? null : result(value, true));
    const filename = `cell-${count}`;
    let script;
    try {
      script = new vm.Script(code, { filename });
    } catch (error) {
      if (!/await/.test(String(error && error.message))) return finish(failure(error));
      // Top-level await: Node's REPL evaluator rewrites the cell so its declarations last.
      return server.eval(code, server.context, filename, (error, value) =>
        error ? finish(failure(error instanceof repl.Recoverable ? error.err : error)) : done(value),
      );
    }
    try {
      done(script.runInContext(server.context, { breakOnSigint: true, displayErrors: false }));
    } catch (error) {
      finish(failure(error));
    }
  });
}

function execute(request) {
  const saved = {};
  for (const [name, value] of Object.entries(request.env || {})) {
    saved[name] = process.env[name];
    process.env[name] = String(value);
  }
  const setup = request.setup || {};
  Object.assign(process.env, setup.env || {});
  if (setup.cwd) {
    try {
      process.chdir(setup.cwd);
    } catch (_error) {
      // a workdir that does not exist: stay where we are
    }
  }
  return run(String(request.code || "")).then(() => {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    send({ type: "done", execution_count: count });
  });
}

// Requests, one per line, run one after the other; the event loop runs between them, so a
// cell's timers and promises go on after it returns.
let queue = Promise.resolve();
let pending = "";
const requests = fs.createReadStream(null, { fd: inFd });
requests.on("data", (chunk) => {
  pending += chunk.toString();
  let newline;
  while ((newline = pending.indexOf("\n")) >= 0) {
    const request = JSON.parse(pending.slice(0, newline));
    pending = pending.slice(newline + 1);
    queue = queue.then(() => execute(request));
  }
});
requests.on("end", () => queue.then(() => process.exit(0)));
send({ type: "ready" });
