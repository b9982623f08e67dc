// The pages for what sandboxes are made from and kept in: images, volumes, snapshots, and for
// admin keys, pools and keys.

import { api, ApiError } from "./api.js";
import { age, bytes, type Child, guarded, h, show, table, when } from "./dom.js";
import type { Page } from "./main.js";

type Row = Record<string, unknown>;

/** A page listing `path`, with a row per item and an optional form above. */
function listing(
  title: string,
  path: string,
  headings: string[],
  cells: (item: Row, refresh: () => Promise<void>, status: HTMLElement) => (Child | Child[])[],
  form?: (refresh: () => Promise<void>, status: HTMLElement) => HTMLElement,
): Page {
  return async (main) => {
    const status = h("p", { role: "status", class: "notice" });
    const list = h("div", { class: "scroll" });
    const refresh = async (): Promise<void> => {
      try {
        const items = await api<Row[]>("GET", path);
        show(list, table(headings, items.map((item) => cells(item, refresh, status)), title));
      } catch (error) {
        if (error instanceof ApiError && error.status === 403) {
          show(list, h("p", { class: "notice" }, `${title} are managed with an admin key: ${error.message}`));
          return;
        }
        throw error;
      }
    };
    show(main, h("h1", {}, title), form ? form(refresh, status) : "", status, list);
    await refresh();
  };
}

const remove = (label: string, path: string, refresh: () => Promise<void>, status: HTMLElement): HTMLButtonElement =>
  h("button", {
    type: "button",
    class: "danger",
    "aria-label": label,
    onclick: guarded(status, async () => {
      if (!confirm(`${label}?`)) return;
      await api("DELETE", path);
      await refresh();
    }),
  }, "Delete");

export const imagesPage = listing("Images", "/v1/images", ["Name", "Id", "Size", "Layers", "Built", ""], (image, refresh, status) => [
  String(image.name ?? "—"),
  h("code", {}, String(image.id)),
  bytes(Number(image.size_bytes)),
  String(image.layers),
  `${age(Number(image.created_at))} ago`,
  remove(`Delete image ${String(image.name ?? image.id)}`, `/v1/images/${String(image.id)}`, refresh, status),
]);

export const volumesPage = listing(
  "Volumes",
  "/v1/volumes",
  ["Name", "Size", "Used", "Mounted by", "Created", ""],
  (volume, refresh, status) => [
    String(volume.name),
    `${String(volume.size_mb)} MiB`,
    bytes(Number(volume.used_bytes)),
    (volume.sandboxes as string[]).map((id) => h("a", { href: `#/sandboxes/${id}` }, id, " ")),
    when(Number(volume.created_at)),
    remove(`Delete volume ${String(volume.name)}`, `/v1/volumes/${String(volume.id)}`, refresh, status),
  ],
  (refresh, status) => {
    const name = h("input", { id: "volume-name", required: true, pattern: "[a-z0-9._-]{1,64}" });
    const size = h("input", { id: "volume-size", type: "number", min: 16, value: 1024, required: true });
    return h("form", {
      class: "inline",
      "aria-label": "New volume",
      onsubmit: (event: Event) => {
        event.preventDefault();
        void guarded(status, async () => {
          await api("POST", "/v1/volumes", { json: { name: name.value, size_mb: Number(size.value) } });
          name.value = "";
          await refresh();
        })();
      },
    }, h("label", { for: "volume-name" }, "Name"), name, h("label", { for: "volume-size" }, "Size (MiB)"), size, h("button", { type: "submit" }, "New volume"));
  },
);

export const snapshotsPage = listing("Snapshots", "/v1/snapshots", ["Name", "Of sandbox", "Runtime", "Size", "Taken", ""], (snapshot, refresh, status) => [
  String(snapshot.name ?? snapshot.id),
  h("code", {}, String(snapshot.sandbox_id)),
  String(snapshot.runtime),
  bytes(Number(snapshot.size_bytes)),
  `${age(Number(snapshot.created_at))} ago`,
  h("span", { class: "actions" },
    h("button", { type: "button", class: "secondary", onclick: guarded(status, async () => {
      const made = await api<{ id: string }>("POST", "/v1/sandboxes", { json: { snapshot: snapshot.id } });
      location.hash = `#/sandboxes/${made.id}`;
    }) }, "Start a sandbox"),
    remove(`Delete snapshot ${String(snapshot.name ?? snapshot.id)}`, `/v1/snapshots/${String(snapshot.id)}`, refresh, status),
  ),
]);

export const poolsPage = listing("Pools", "/v1/pools", ["Name", "Runtime", "Image", "Size", "Idle", "Hits / misses", "Last error", ""], (pool, refresh, status) => [
  String(pool.name),
  String(pool.runtime),
  String(pool.image),
  String(pool.size),
  String(pool.idle),
  `${String(pool.hits)} / ${String(pool.misses)}`,
  String(pool.last_error ?? "—"),
  remove(`Delete pool ${String(pool.name)}`, `/v1/pools/${String(pool.name)}`, refresh, status),
]);

export const keysPage = listing(
  "Keys",
  "/v1/keys",
  ["Name", "Id", "Admin", "Created", "Revoked", ""],
  (item, refresh, status) => [
    String(item.name),
    h("code", {}, String(item.id)),
    item.admin ? "admin" : "",
    when(Number(item.created_at)),
    item.revoked_at ? when(Number(item.revoked_at)) : "",
    item.revoked_at ? "" : remove(`Revoke key ${String(item.name)}`, `/v1/keys/${String(item.id)}`, refresh, status),
  ],
  (refresh, status) => {
    const name = h("input", { id: "key-name", required: true });
    const secret = h("p", { class: "secret", "aria-live": "polite" });
    return h("div", {},
      h("form", {
        class: "inline",
        "aria-label": "New key",
        onsubmit: (event: Event) => {
          event.preventDefault();
          void guarded(status, async () => {
            const made = await api<{ secret: string; name: string }>("POST", "/v1/keys", { json: { name: name.value } });
            show(secret, `The key ${made.name}, shown this once: `, h("code", {}, made.secret));
            name.value = "";
            await refresh();
          })();
        },
      }, h("label", { for: "key-name" }, "Name"), name, h("button", { type: "submit" }, "New key")),
      secret,
    );
  },
);
