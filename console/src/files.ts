// A sandbox's files: browse directories, download a file, upload files from this computer.

import { api, call, type FileEntry } from "./api.js";
import { bytes, guarded, h, show, table, when } from "./dom.js";

export function fileBrowser(where: HTMLElement, sandboxId: string, start = "/root"): () => void {
  const base = `/v1/sandboxes/${sandboxId}/files`;
  const status = h("p", { role: "status", class: "notice" });
  const listing = h("div", { class: "scroll" });
  const pathInput = h("input", { id: "files-path", name: "path", value: start });
  const upload = h("input", { id: "files-upload", type: "file", multiple: true });
  let current = start;

  const open = guarded(status, async () => {
    current = pathInput.value.trim() || "/";
    const entries = await api<FileEntry[]>("GET", base, { query: { path: current } });
    entries.sort((a, b) => (a.type === "dir" ? 0 : 1) - (b.type === "dir" ? 0 : 1) || a.name.localeCompare(b.name));
    const parent = current.replace(/\/[^/]+\/?$/, "") || "/";
    const rows = entries.map((entry) => [
      entry.type === "dir"
        ? h("button", { type: "button", class: "link", onclick: () => go(entry.path) }, `${entry.name}/`)
        : entry.name,
      entry.type,
      entry.type === "file" ? bytes(entry.size) : "",
      when(entry.mtime),
      entry.type === "file"
        ? h("button", { type: "button", class: "secondary", "aria-label": `Download ${entry.name}`, onclick: guarded(status, () => download(entry)) }, "Download")
        : "",
    ]);
    show(
      listing,
      current !== "/" ? h("button", { type: "button", class: "link", onclick: () => go(parent) }, "↑ Parent directory") : "",
      table(["Name", "Type", "Size", "Modified", ""], rows, `Files in ${current}`),
    );
  });

  function go(path: string): void {
    pathInput.value = path;
    void open();
  }

  async function download(entry: FileEntry): Promise<void> {
    const response = await call("GET", `${base}/content`, { query: { path: entry.path } });
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: entry.name });
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  const send = guarded(status, async () => {
    const chosen = [...(upload.files ?? [])];
    for (const file of chosen) {
      const target = `${current.replace(/\/$/, "")}/${file.name}`;
      await call("PUT", `${base}/content`, { query: { path: target }, body: file });
    }
    upload.value = "";
    await open();
    status.textContent = `Uploaded ${chosen.map((file) => file.name).join(", ")}.`;
  });

  show(
    where,
    h(
      "form",
      {
        class: "inline",
        "aria-label": "Directory",
        onsubmit: (event: Event) => {
          event.preventDefault();
          void open();
        },
      },
      h("label", { for: "files-path" }, "Directory"),
      pathInput,
      h("button", { type: "submit" }, "Open"),
    ),
    h(
      "form",
      {
        class: "inline",
        "aria-label": "Upload",
        onsubmit: (event: Event) => {
          event.preventDefault();
          void send();
        },
      },
      h("label", { for: "files-upload" }, "Upload to this directory"),
      upload,
      h("button", { type: "submit" }, "Upload"),
    ),
    status,
    listing,
  );
  void open();
  return () => undefined;
}
