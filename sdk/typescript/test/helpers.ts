// What every test file shares: the server the tests were given, and sandboxes that end with
// the test that made them.
//
// CORRAL_URL and CORRAL_API_KEY name a running `corral serve` (tests/e2e/test_typescript.py
// starts one and runs these tests); CORRAL_TEST_RUNTIMES lists the runtimes it can start.

import type { TestContext } from "node:test";

import { Client, type CorralError, type CreateOptions, Sandbox } from "../src/index.js";

if (!process.env.CORRAL_URL || !process.env.CORRAL_API_KEY) {
  throw new Error("set CORRAL_URL and CORRAL_API_KEY to a running corral serve (or run tests/e2e/test_typescript.py)");
}

export const client = new Client();
export const runtimes = (process.env.CORRAL_TEST_RUNTIMES ?? "namespaces").split(",").filter(Boolean);
/** Each test's own time limit: long enough for gVisor on a busy 2-core machine, short of a hang. */
export const LIMIT = { timeout: 180_000 };

/** A sandbox that is terminated when the test `t` ends, however it ends. */
export async function sandboxFor(t: TestContext, options: CreateOptions = {}): Promise<Sandbox> {
  const sandbox = await Sandbox.create({ runtime: "namespaces", ...options });
  t.after(() => sandbox.terminate().catch(() => undefined));
  return sandbox;
}

/** Skip `t` unless the server runs gVisor sandboxes. */
export function needsGvisor(t: TestContext): boolean {
  if (!runtimes.includes("gvisor")) {
    t.skip("gvisor is not among CORRAL_TEST_RUNTIMES");
    return true;
  }
  return false;
}

/** Whether `promise` rejects with an error of class `cls` and code `code`; that error. */
export async function rejection<E extends CorralError>(
  promise: Promise<unknown>,
  cls: abstract new (...args: never[]) => E,
  code?: string,
): Promise<E> {
  try {
    await promise;
  } catch (caught) {
    const error = caught as E;
    if (!(error instanceof cls)) throw new Error(`expected ${cls.name}, got ${String(caught)}`);
    if (code !== undefined && error.code !== code) throw new Error(`expected code ${code}, got ${error.code}: ${error.message}`);
    return error;
  }
  throw new Error(`expected ${cls.name} (${code}), but it succeeded`);
}
