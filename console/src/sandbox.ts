// One sandbox: what it is, what to do with it, and tabs for its terminal, files, processes,
// events, audit trail and previews.

import { api, call, type Sandbox } from "./api.js";
import { age, guarded, h, show, table, when } from "./dom.js";
import { fileBrowser } from "./files.js";
import type { Page } from "./main.js";
import { terminal } from "./terminal.js";

interface Process {
  id: number;
  pid: number;
  argv: string[];
  running: boolean;
  exit_code: number | null;
}
interface Preview {
  id: string;
  port: number;
  public: boolean;
  url: string;
  signed_url?: string | null;
  expires_at: number | null;
}
interface AuditEntry {
  id: number;
  at: number;
  operation: string;
  status: number | null;
  exit_code: number | null;
  error: string | null;
  duration: number;
}

const TABS = ["Terminal", "Files", "Processes", "Events", "Audit", "Previews"] as const;
type Tab = (typeof TABS)[number];

export const sandboxPage: Page = async (main, id) => {
  const path = `/v1/sandboxes/${id}`;
  let info = await api<Sandbox>("GET", path);
  const status = h("p", { role: "status", class: "notice" });
  const summary = h("dl", { class: "summary" });
  const actions = h("div", { class: "actions" });
  const panel = h("section", { class: "panel", role: "tabpanel", id: "tab-panel", tabindex: 0 });
  const tabs = TABS.map((name) =>
    h("button", { type: "button", role: "tab", id: `tab-${name.toLowerCase()}`, "aria-controls": "tab-panel", "aria-selected": "false", tabindex: -1 }, name),
  );
  let closeTab: () => void = () => undefined;

  function draw(): void {
    const rows: [string, string][] = [
      ["State", info.state],
      ["Runtime", info.runtime],
      ["Image", info.image],
      ["Resources", `${info.spec.cpu} CPU, ${info.spec.memory_mb} MiB memory, ${info.spec.disk_mb} MiB disk`],
      ["Network", info.spec.network],
      ["Created", `${when(info.created_at)} (${age(info.created_at)} ago)`],
      ["Ends", info.expires_at ? when(info.expires_at) : info.end_reason ?? "—"],
    ];
    show(summary, rows.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
    const act = (label: string, suffix: string, method = "POST") =>
      h("button", {
        type: "button",
        class: label === "Terminate" ? "danger" : "secondary",
        onclick: guarded(status, async () => {
          info = await api<Sandbox>(method, path + suffix);
          draw();
        }),
      }, label);
    const state = info.state;
    show(
      actions,
      state === "running" ? act("Pause", "/pause") : null,
      state === "paused" ? act("Resume", "/resume") : null,
      state === "running" && info.runtime === "gvisor" ? act("Hibernate", "/hibernate") : null,
      state === "hibernated" ? act("Wake", "/wake") : null,
      ["running", "paused", "hibernated"].includes(state) ? act("Terminate", "", "DELETE") : null,
    );
  }

  function select(name: Tab): void {
    closeTab();
    for (const tab of tabs) {
      const chosen = tab.textContent === name;
      tab.setAttribute("aria-selected", String(chosen));
      tab.tabIndex = chosen ? 0 : -1;
    }
    panel.setAttribute("aria-labelledby", `tab-${name.toLowerCase()}`);
    closeTab = open(name, panel, id!, path, () => info) ?? (() => undefined);
  }

  const tablist = h("div", { role: "tablist", "aria-label": "Sandbox" }, tabs);
  tablist.addEventListener("click", (event) => {
    const tab = (event.target as HTMLElement).closest("[role=tab]");
    if (tab) select(tab.textContent as Tab);
  });
  tablist.addEventListener("keydown", (event) => {
    const at = tabs.indexOf(document.activeElement as HTMLButtonElement);
    if (at < 0 || !["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) return;
    event.preventDefault();
    const next = event.key === "Home" ? 0 : event.key === "End" ? tabs.length - 1 : (at + (event.key === "ArrowRight" ? 1 : -1) + tabs.length) % tabs.length;
    tabs[next]!.focus();
    select(TABS[next]!);
  });

  show(main, h("h1", {}, `Sandbox ${id}`), summary, actions, status, tablist, panel);
  draw();
  select(info.state === "running" ? "Terminal" : "Events");
  const timer = setInterval(() => {
    void api<Sandbox>("GET", path).then((fresh) => {
      if (fresh.state !== info.state) {
        info = fresh;
        draw();
      }
    });
  }, 3000);
  return () => {
    clearInterval(timer);
    closeTab();
  };
};

function open(name: Tab, panel: HTMLElement, id: string, path: string, info: () => Sandbox): (() => void) | void {
  switch (name) {
    case "Terminal":
      if (info().state !== "running") {
        show(panel, h("p", {}, `The sandbox is ${info().state}; a terminal needs it running.`));
        return;
      }
      return terminal(panel, id);
    case "Files":
      return fileBrowser(panel, id);
    case "Processes":
      return processes(panel, path);
    case "Events":
      return events(panel, id, info());
    case "Audit":
      return auditTrail(panel, id);
    case "Previews":
      return previews(panel, path);
  }
}

function processes(panel: HTMLElement, path: string): () => void {
  const status = h("p", { role: "status", class: "notice" });
  const list = h("div", { class: "scroll" });
  const refresh = guarded(status, async () => {
    const found = await api<Process[]>("GET", `${path}/processes`);
    const rows = found.map((p) => [
      String(p.pid),
      h("code", {}, p.argv.join(" ")),
      p.running ? "running" : `exited ${p.exit_code ?? ""}`,
      p.running
        ? h("button", { type: "button", class: "secondary", "aria-label": `Stop process ${p.pid}`, onclick: guarded(status, async () => {
            await api("POST", `${path}/processes/${p.id}/signal`, { json: { signal: "SIGTERM" } });
            await refresh();
          }) }, "Stop")
        : "",
    ]);
    show(list, table(["PID", "Command", "State", ""], rows, "Processes"));
  });
  show(
    panel,
    h("div", { class: "actions" },
      h("button", { type: "button", class: "secondary", onclick: refresh }, "Refresh"),
      h("button", { type: "button", class: "danger", onclick: guarded(status, async () => {
        const { killed } = await api<{ killed: number }>("POST", `${path}/processes/kill-all`);
        await refresh();
        status.textContent = `Killed ${killed} processes.`;
      }) }, "Kill all processes"),
    ),
    status,
    list,
  );
  void refresh();
  const timer = setInterval(() => void refresh(), 3000);
  return () => clearInterval(timer);
}

function events(panel: HTMLElement, id: string, info: Sandbox): () => void {
  const list = h("ol", { class: "events", "aria-live": "polite" });
  const add = (at: number, text: string) => list.prepend(h("li", {}, h("time", {}, when(at)), " ", text));
  for (const change of info.history) add(change.at, `${change.state}${change.reason ? ` (${change.reason})` : ""}`);
  const stop = new AbortController();
  void (async () => {
    const response = await call("GET", "/v1/events", { query: { sandbox_id: id } });
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    stop.signal.addEventListener("abort", () => void reader.cancel());
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      pending += value;
      const lines = pending.split("\n");
      pending = lines.pop() ?? "";
      for (const line of lines.filter((l) => l.startsWith("data: "))) {
        const event = JSON.parse(line.slice(6)) as { state?: string; reason?: string; at?: number; type: string };
        add(event.at ?? Date.now() / 1000, `${event.state ?? event.type}${event.reason ? ` (${event.reason})` : ""}`);
      }
    }
  })().catch(() => undefined);
  show(panel, h("h2", {}, "State changes, newest first"), list);
  return () => stop.abort();
}

function auditTrail(panel: HTMLElement, id: string): void {
  const status = h("p", { role: "status", class: "notice" });
  show(panel, h("h2", {}, "Audit trail, newest first"), status);
  void guarded(status, async () => {
    const page = await api<{ entries: AuditEntry[] }>("GET", "/v1/audit", { query: { sandbox: id, order: "desc", limit: 200 } });
    const rows = page.entries.map((e) => [
      when(e.at),
      h("code", {}, e.operation),
      e.error ?? (e.exit_code !== null ? `exit ${e.exit_code}` : String(e.status ?? "")),
      `${Math.round(e.duration * 1000)} ms`,
    ]);
    panel.appendChild(h("div", { class: "scroll" }, table(["When", "Operation", "Outcome", "Took"], rows, "Audit trail")));
  })();
}

function previews(panel: HTMLElement, path: string): void {
  const status = h("p", { role: "status", class: "notice" });
  const list = h("div", { class: "scroll" });
  const port = h("input", { id: "preview-port", type: "number", min: 1, max: 65535, required: true, value: 8000 });
  const pub = h("input", { id: "preview-public", type: "checkbox" });
  const made = new Map<string, string>(); // signed URLs, known only to the call that made them
  const refresh = guarded(status, async () => {
    const found = await api<Preview[]>("GET", `${path}/previews`);
    const rows = found.map((p) => [
      String(p.port),
      p.public ? "public" : "token",
      h("code", {}, p.url),
      h("span", { class: "actions" },
        h("a", { class: "button", href: made.get(p.id) ?? p.url, target: "_blank", rel: "noopener noreferrer" }, `Open port ${p.port}`),
        h("button", { type: "button", class: "secondary", "aria-label": `Revoke the preview of port ${p.port}`, onclick: guarded(status, async () => {
          await api("DELETE", `${path}/previews/${p.id}`);
          await refresh();
        }) }, "Revoke"),
      ),
    ]);
    show(list, table(["Port", "Access", "URL", ""], rows, "Previews"));
  });
  show(
    panel,
    h("form", {
      class: "inline",
      "aria-label": "Open a port",
      onsubmit: (event: Event) => {
        event.preventDefault();
        void guarded(status, async () => {
          const preview = await api<Preview>("POST", `${path}/previews`, { json: { port: Number(port.value), public: pub.checked } });
          if (preview.signed_url) made.set(preview.id, preview.signed_url);
          await refresh();
        })();
      },
    },
      h("label", { for: "preview-port" }, "Port"), port,
      pub, h("label", { for: "preview-public" }, "Public (no token)"),
      h("button", { type: "submit" }, "Open port"),
    ),
    status,
    list,
  );
  void refresh();
}
