/**
 * The API's data, named as the SDK uses it. Each type is the server's own schema, generated
 * from its OpenAPI document into openapi.ts (`npm run generate`; a test fails when it is stale),
 * so the SDK and the server cannot drift apart unseen.
 */

import type { components } from "./openapi.js";

export type Schemas = components["schemas"];

/** A sandbox: its state, runtime, spec and (once ended) why it ended. */
export type SandboxInfo = Schemas["SandboxOut"];
/** What a sandbox was created with. */
export type SandboxSpec = Schemas["SpecBody"];
/** The state a sandbox is in. */
export type SandboxState = SandboxInfo["state"];
/** A file or directory in a sandbox. */
export type FileInfo = Schemas["FileOut"];
/** A process started in a sandbox, running or recently ended. */
export type ProcessInfo = Schemas["ProcessOut"];
/** A snapshot of a sandbox's memory and files. */
export type SnapshotInfo = Schemas["SnapshotOut"];
/** An image built on the server. */
export type BuiltImage = Schemas["ImageOut"];
/** A code context: an interpreter with its own variables. */
export type CodeContext = Schemas["ContextOut"];
/** A sandbox's port opened to HTTP clients. */
export type PreviewInfo = Schemas["PreviewOut"];
/** A volume: a disk that outlives sandboxes and is mounted into them. */
export type VolumeInfo = Schemas["VolumeOut"];
