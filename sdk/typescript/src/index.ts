/**
 * Corral's TypeScript SDK: sandboxes for AI agents on your own Corral server.
 *
 * @example
 * import { Sandbox } from "@corral/sdk"; // CORRAL_URL and CORRAL_API_KEY from the environment
 * const sandbox = await Sandbox.create();
 * console.log((await sandbox.run("python3 -c 'print(6*7)'")).stdout); // "42\n"
 * await sandbox.terminate();
 */

export { Client, DEFAULT_URL, type ClientOptions } from "./client.js";
export { Execution, Result, type ExecutionError } from "./code.js";
export * from "./errors.js";
export { Files } from "./files.js";
export { Image, type BuildEvent, type BuildOptions } from "./image.js";
export { Output, Process, Stdin, type OutputCallback, type ProcessExit } from "./process.js";
export {
  Sandbox,
  type CommandResult,
  type CreateOptions,
  type ExecOptions,
  type Network,
  type RunCodeOptions,
  type RunOptions,
} from "./sandbox.js";
export type * from "./types.js";
export { Volume, type VolumeOptions, type VolumeRef } from "./volume.js";
