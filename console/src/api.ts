// The API as the console calls it: the key lives in this tab's session storage only, and
// every request and WebSocket carries it.

const STORE = "corral.key";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export const key = {
  get: (): string | null => sessionStorage.getItem(STORE),
  set: (value: string): void => sessionStorage.setItem(STORE, value),
  clear: (): void => sessionStorage.removeItem(STORE),
};

type Query = Record<string, string | number | boolean | undefined>;

export async function call(
  method: string,
  path: string,
  options: { json?: unknown; query?: Query; body?: BodyInit } = {},
): Promise<Response> {
  const headers: Record<string, string> = { Authorization: `Bearer ${key.get() ?? ""}` };
  let body = options.body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(options.query ?? {})) {
    if (value !== undefined) params.set(name, String(value));
  }
  const url = params.size ? `${path}?${params}` : path;
  const response = await fetch(url, { method, headers, body });
  if (response.status >= 400) {
    const text = await response.text();
    let code = "http_error";
    let message = `HTTP ${response.status}`;
    try {
      const error = (JSON.parse(text) as { error: { code: string; message: string } }).error;
      code = error.code;
      message = error.message;
    } catch {
      /* not Corral's JSON: keep the status */
    }
    if (response.status === 401) window.dispatchEvent(new Event("corral:unauthorized"));
    throw new ApiError(response.status, code, message);
  }
  return response;
}

export async function api<T>(method: string, path: string, options: Parameters<typeof call>[2] = {}): Promise<T> {
  const response = await call(method, path, options);
  const text = await response.text();
  return (text ? JSON.parse(text) : undefined) as T;
}

/** A WebSocket to the API: a browser cannot send headers, so the key goes as a subprotocol. */
export function socket(path: string): WebSocket {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url, ["corral", `corral.key.${key.get() ?? ""}`]);
  ws.binaryType = "arraybuffer";
  return ws;
}

export interface Sandbox {
  id: string;
  state: string;
  runtime: string;
  image: string;
  created_at: number;
  expires_at: number | null;
  end_reason: string | null;
  metadata: Record<string, string>;
  history: { state: string; at: number; reason: string | null }[];
  spec: { cpu: number; memory_mb: number; disk_mb: number; network: string };
}

export interface Sample {
  at: number;
  cpu_percent: number;
  memory_bytes: number;
  processes: number;
  disk_bytes: number;
}

export interface FileEntry {
  name: string;
  path: string;
  type: string;
  size: number;
  mode: number;
  mtime: number;
}
