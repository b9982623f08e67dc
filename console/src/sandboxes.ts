// The home page: the metrics at a glance, a form to start a sandbox, and every sandbox live
// (state, runtime, image, age, CPU and memory sparklines), refreshed every two seconds.

import { api, type Sample, type Sandbox } from "./api.js";
import { age, bytes, guarded, h, notice, show, sparkline, table } from "./dom.js";
import type { Page } from "./main.js";

const HISTORY = 30; // samples kept per sandbox for its sparklines
const LIVE = new Set(["starting", "running", "paused", "hibernated"]);

interface Latest {
  sandbox_id: string;
  sample: Sample | null;
}

export const sandboxesPage: Page = async (main) => {
  const history = new Map<string, Sample[]>();
  const glance = h("section", { class: "glance", "aria-label": "At a glance" });
  const list = h("div", { class: "scroll" });
  const status = h("p", { role: "status", class: "notice" });
  const showEnded = h("input", { type: "checkbox", id: "show-ended" });
  const health = await api<{ runtimes: Record<string, string | null> }>("GET", "/healthz");
  const runtimes = Object.entries(health.runtimes).filter(([, reason]) => reason === null).map(([name]) => name);
  const runtime = h("select", { id: "new-runtime", name: "runtime" }, runtimes.map((name) => h("option", { value: name }, name)));
  const image = h("input", { id: "new-image", name: "image", value: "debian", required: true });
  const create = h(
    "form",
    {
      class: "inline",
      "aria-label": "New sandbox",
      onsubmit: (event: Event) => {
        event.preventDefault();
        void guarded(status, async () => {
          const made = await api<Sandbox>("POST", "/v1/sandboxes", { json: { runtime: runtime.value, image: image.value.trim() } });
          location.hash = `#/sandboxes/${made.id}`;
        })();
      },
    },
    h("label", { for: "new-runtime" }, "Runtime"),
    runtime,
    h("label", { for: "new-image" }, "Image"),
    image,
    h("button", { type: "submit" }, "New sandbox"),
  );
  show(
    main,
    h("h1", {}, "Sandboxes"),
    glance,
    create,
    status,
    h("p", {}, showEnded, h("label", { for: "show-ended" }, " Show ended sandboxes")),
    list,
  );
  showEnded.addEventListener("change", () => void refresh());

  async function refresh(): Promise<void> {
    const [sandboxes, latest] = await Promise.all([
      api<Sandbox[]>("GET", "/v1/sandboxes"),
      api<Latest[]>("GET", "/v1/metrics/sandboxes"),
    ]);
    for (const { sandbox_id, sample } of latest) {
      if (sample === null) continue;
      const samples = history.get(sandbox_id) ?? [];
      if (samples.at(-1)?.at !== sample.at) samples.push(sample);
      history.set(sandbox_id, samples.slice(-HISTORY));
    }
    const live = sandboxes.filter((s) => LIVE.has(s.state));
    const current = latest.map((l) => l.sample).filter((s): s is Sample => s !== null);
    show(
      glance,
      stat("Running", live.filter((s) => s.state === "running").length),
      stat("Paused", live.filter((s) => s.state === "paused").length),
      stat("Hibernated", live.filter((s) => s.state === "hibernated").length),
      stat("CPU", `${Math.round(current.reduce((sum, s) => sum + s.cpu_percent, 0))} %`),
      stat("Memory", bytes(current.reduce((sum, s) => sum + s.memory_bytes, 0))),
      stat("Processes", current.reduce((sum, s) => sum + s.processes, 0)),
    );
    const shown = (showEnded.checked ? sandboxes : live).sort((a, b) => b.created_at - a.created_at);
    const rows = shown.map((sandbox) => {
      const samples = history.get(sandbox.id) ?? [];
      const last = samples.at(-1);
      return [
        h("a", { href: `#/sandboxes/${sandbox.id}` }, sandbox.id),
        h("span", { class: `state ${sandbox.state}` }, sandbox.state),
        sandbox.runtime,
        sandbox.image,
        age(sandbox.created_at),
        h(
          "span",
          { class: "metric" },
          sparkline(samples.map((s) => s.cpu_percent), `CPU ${last ? Math.round(last.cpu_percent) : 0} %`, 100),
          last ? `${Math.round(last.cpu_percent)} %` : "–",
        ),
        h(
          "span",
          { class: "metric" },
          sparkline(samples.map((s) => s.memory_bytes), `memory ${last ? bytes(last.memory_bytes) : "unknown"}`, sandbox.spec.memory_mb * 1024 * 1024),
          last ? bytes(last.memory_bytes) : "–",
        ),
      ];
    });
    show(list, table(["Sandbox", "State", "Runtime", "Image", "Age", "CPU", "Memory"], rows, "Your sandboxes"));
  }

  await refresh();
  const timer = setInterval(() => void refresh().catch((error: Error) => notice(status, error.message, true)), 2000);
  return () => clearInterval(timer);
};

function stat(label: string, value: string | number): HTMLElement {
  return h("div", { class: "stat" }, h("span", { class: "label" }, label), h("span", { class: "value" }, value));
}
