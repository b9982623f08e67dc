/**
 * Corral's errors: one class tree, the same as the Python SDK's, each with the server's stable
 * `code` (a machine-readable string such as "sandbox_not_found") and HTTP `status`.
 *
 * The class comes from the code when this version knows it, else from the HTTP status; the
 * server's code and message are kept either way, so `error.code` is always what the server said.
 */

import type { CommandResult } from "./sandbox.js";

export class CorralError extends Error {
  static readonly status: number = 500;
  static readonly defaultCode: string = "corral_error";
  /** The server's machine-readable code, e.g. "sandbox_not_found". */
  readonly code: string;
  /** The HTTP status it came with (or would have). */
  readonly status: number;
  /** Seconds to wait before retrying, where the server said (429, 503). */
  retryAfter?: number;

  constructor(message: string, code?: string, status?: number) {
    super(message);
    const cls = new.target as typeof CorralError;
    this.name = cls.name;
    this.code = code ?? cls.defaultCode;
    this.status = status ?? cls.status;
  }
}

export class InvalidRequest extends CorralError {
  static override readonly status: number = 400;
  static override readonly defaultCode: string = "invalid_request";
}
export class InvalidPath extends InvalidRequest {
  static override readonly defaultCode: string = "invalid_path";
}
export class AuthError extends CorralError {
  static override readonly status: number = 401;
  static override readonly defaultCode: string = "unauthorized";
}
export class PermissionDenied extends CorralError {
  static override readonly status: number = 403;
  static override readonly defaultCode: string = "permission_denied";
}
export class NotFound extends CorralError {
  static override readonly status: number = 404;
  static override readonly defaultCode: string = "not_found";
}
export class SandboxNotFound extends NotFound {
  static override readonly defaultCode: string = "sandbox_not_found";
}
export class FileNotFound extends NotFound {
  static override readonly defaultCode: string = "file_not_found";
}
export class ImageNotFound extends NotFound {
  static override readonly defaultCode: string = "image_not_found";
}
export class VolumeNotFound extends NotFound {
  static override readonly defaultCode: string = "volume_not_found";
}
export class ContextNotFound extends NotFound {
  static override readonly defaultCode: string = "context_not_found";
}
/** A command ran past its timeout; `result` holds what it printed until then. */
export class CommandTimeout extends CorralError {
  static override readonly status: number = 408;
  static override readonly defaultCode: string = "command_timeout";
  result?: CommandResult;
}
export class Conflict extends CorralError {
  static override readonly status: number = 409;
  static override readonly defaultCode: string = "conflict";
}
/** The runtime could not save the sandbox's memory; nothing was saved (try again). */
export class CheckpointFailed extends Conflict {
  static override readonly defaultCode: string = "checkpoint_failed";
}
export class InvalidState extends Conflict {
  static override readonly defaultCode: string = "invalid_state";
}
export class FileExists extends Conflict {
  static override readonly defaultCode: string = "file_exists";
}
export class PathBusy extends Conflict {
  static override readonly defaultCode: string = "path_busy";
}
export class VolumeInUse extends Conflict {
  static override readonly defaultCode: string = "volume_in_use";
}
export class PayloadTooLarge extends CorralError {
  static override readonly status: number = 413;
  static override readonly defaultCode: string = "payload_too_large";
}
export class LimitReached extends CorralError {
  static override readonly status: number = 429;
  static override readonly defaultCode: string = "limit_reached";
}
export class RuntimeUnavailable extends CorralError {
  static override readonly status: number = 422;
  static override readonly defaultCode: string = "runtime_unavailable";
}
export class UnsupportedLanguage extends CorralError {
  static override readonly status: number = 422;
  static override readonly defaultCode: string = "unsupported_language";
}
export class NoSpace extends CorralError {
  static override readonly status: number = 507;
  static override readonly defaultCode: string = "no_space";
}
export class PortClosed extends CorralError {
  static override readonly status: number = 502;
  static override readonly defaultCode: string = "port_closed";
}
export class SandboxFailed extends CorralError {
  static override readonly status: number = 500;
  static override readonly defaultCode: string = "sandbox_failed";
}
/** An image step failed: `step` (1-based) and the end of its output in `log`. */
export class ImageBuildFailed extends CorralError {
  static override readonly status: number = 422;
  static override readonly defaultCode: string = "image_build_failed";
  step = 0;
  log = "";
}
export class DeploymentFailed extends CorralError {
  static override readonly status: number = 422;
  static override readonly defaultCode: string = "deployment_failed";
}
export class AgentUnavailable extends SandboxFailed {
  static override readonly status: number = 503;
  static override readonly defaultCode: string = "agent_unavailable";
}
export class SandboxEnded extends SandboxFailed {
  static override readonly status: number = 410;
  static override readonly defaultCode: string = "sandbox_ended";
}
export class ServiceUnavailable extends CorralError {
  static override readonly status: number = 503;
  static override readonly defaultCode: string = "service_unavailable";
}
/** The server could not be reached, or a stream to it broke. */
export class ConnectionFailed extends ServiceUnavailable {
  static override readonly defaultCode: string = "connection_failed";
}

type ErrorClass = typeof CorralError;

// Most general first, so that a status maps to its most general class.
const CLASSES: ErrorClass[] = [
  CorralError,
  InvalidRequest,
  AuthError,
  PermissionDenied,
  NotFound,
  CommandTimeout,
  Conflict,
  PayloadTooLarge,
  LimitReached,
  RuntimeUnavailable,
  UnsupportedLanguage,
  NoSpace,
  PortClosed,
  SandboxFailed,
  ImageBuildFailed,
  DeploymentFailed,
  ServiceUnavailable,
  InvalidPath,
  SandboxNotFound,
  FileNotFound,
  ImageNotFound,
  VolumeNotFound,
  ContextNotFound,
  CheckpointFailed,
  InvalidState,
  FileExists,
  PathBusy,
  VolumeInUse,
  AgentUnavailable,
  SandboxEnded,
  ConnectionFailed,
];

const BY_CODE = new Map<string, ErrorClass>(CLASSES.map((cls) => [cls.defaultCode, cls]));
// Codes the sandbox's agent reports itself, kept as they are.
const GUEST_CODES: Record<string, ErrorClass> = {
  invalid_cwd: InvalidRequest,
  invalid_user: InvalidRequest,
  command_not_found: InvalidRequest,
  process_not_found: NotFound,
  cancelled: Conflict,
};
for (const [code, cls] of Object.entries(GUEST_CODES)) BY_CODE.set(code, cls);
const BY_STATUS = new Map<number, ErrorClass>();
for (const cls of CLASSES) {
  if (cls !== CorralError && !BY_STATUS.has(cls.status)) BY_STATUS.set(cls.status, cls);
}
BY_STATUS.set(500, CorralError);
BY_STATUS.set(503, ServiceUnavailable);

/** Rebuild the error a server sent (`{"error": {"code", "message"}}`) as our own class. */
export function errorFrom(status: number, code: string, message: string): CorralError {
  let cls = BY_CODE.get(code) ?? BY_STATUS.get(status);
  if (cls === undefined) cls = status >= 400 && status < 500 ? InvalidRequest : CorralError;
  return new cls(message, code, status);
}

/** The error in an HTTP answer's body, whatever the body is. */
export function errorOfBody(status: number, body: string, retryAfter?: string | null): CorralError {
  let made: CorralError;
  try {
    const error = (JSON.parse(body) as { error: { code: unknown; message: unknown } }).error;
    made = errorFrom(status, String(error.code), String(error.message));
  } catch {
    made = errorFrom(status, "http_error", `HTTP ${status}: ${body.slice(0, 500)}`);
  }
  if (retryAfter && /^\d+$/.test(retryAfter)) made.retryAfter = Number(retryAfter);
  return made;
}

/** The error for a server that cannot be reached: what to do depends on why. */
export function unreachable(url: string, error: unknown): ConnectionFailed {
  const reason = error instanceof Error ? error.message : String(error);
  const code = String((error as { code?: unknown } | undefined)?.code ?? "");
  if (/CERT|SELF_SIGNED|UNABLE_TO_(VERIFY|GET_ISSUER)/.test(code)) {
    return new ConnectionFailed(
      `the Corral server at ${url} has a TLS certificate Node does not trust (${reason}): start Node ` +
        "with NODE_EXTRA_CA_CERTS set to the CA file `corral serve` printed (the one CORRAL_CA names)",
    );
  }
  return new ConnectionFailed(
    `cannot reach the Corral server at ${url} (${reason}); is \`corral serve\` running, and is CORRAL_URL right?`,
  );
}
