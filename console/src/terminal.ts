// A terminal in the browser (xterm.js) on a process with a PTY, over the exec WebSocket.

import "@xterm/xterm/css/xterm.css";

import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";

import { socket } from "./api.js";
import { h } from "./dom.js";

const SHELL = "command -v bash >/dev/null && exec bash -l || exec sh -l";

/** Open a shell in the sandbox in `where`; what closes it. */
export function terminal(where: HTMLElement, sandboxId: string): () => void {
  const term = new Terminal({
    cursorBlink: true,
    fontSize: 14,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', monospace",
    theme: { background: "#10161d", foreground: "#e8edf2" },
    screenReaderMode: false,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  const box = h("div", { class: "terminal", "aria-label": "Terminal" });
  const status = h("p", { role: "status", class: "notice" }, "Connecting…");
  const help = h("p", { class: "help" }, "Tab completes in the shell; Shift+Tab moves the focus out of the terminal.");
  where.replaceChildren(status, box, help);
  term.open(box);
  // No keyboard trap: Shift+Tab is the browser's (focus moves back), everything else the shell's.
  term.attachCustomKeyEventHandler((event) => !(event.key === "Tab" && event.shiftKey));
  fit.fit();
  const encoder = new TextEncoder();
  const ws = socket(`/v1/sandboxes/${sandboxId}/exec/stream`);
  ws.onopen = () => {
    ws.send(
      JSON.stringify({
        cmd: SHELL,
        stdin: true,
        pty: { rows: term.rows, cols: term.cols },
        env: { TERM: "xterm-256color" },
      }),
    );
  };
  ws.onmessage = (event: MessageEvent<ArrayBuffer | string>) => {
    if (typeof event.data !== "string") {
      const data = new Uint8Array(event.data);
      if (data[0] === 1 || data[0] === 2) term.write(data.subarray(1));
      return;
    }
    const message = JSON.parse(event.data) as { type: string; exit_code?: number; error?: { message: string } };
    if (message.type === "started") {
      status.textContent = "Connected: a shell in the sandbox.";
      term.focus();
    } else if (message.type === "exit") {
      status.textContent = `The shell exited (${message.exit_code ?? "killed"}). Reload the tab for a new one.`;
    } else if (message.type === "error") {
      status.textContent = message.error?.message ?? "The terminal failed.";
      status.className = "notice error";
    }
  };
  ws.onclose = () => {
    if (status.textContent === "Connecting…") {
      status.textContent = "The terminal could not connect.";
      status.className = "notice error";
    }
  };
  const typed = term.onData((text) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    const bytes = encoder.encode(text);
    const frame = new Uint8Array(bytes.length + 1);
    frame.set(bytes, 1); // channel 0: standard input
    ws.send(frame);
  });
  const resized = term.onResize(({ rows, cols }) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", rows, cols }));
  });
  const observer = new ResizeObserver(() => fit.fit());
  observer.observe(box);
  return () => {
    observer.disconnect();
    typed.dispose();
    resized.dispose();
    ws.close();
    term.dispose();
  };
}
