// Corral's web console: routes (by the URL's hash), the page's frame, and logging in with an
// API key, which stays in this tab's session storage and nowhere else.

import "./style.css";

import { ApiError, key } from "./api.js";
import { guarded, h, show } from "./dom.js";
import { imagesPage, keysPage, poolsPage, snapshotsPage, volumesPage } from "./resources.js";
import { sandboxPage } from "./sandbox.js";
import { sandboxesPage } from "./sandboxes.js";

/** A page draws into `main` and returns what stops it (timers, sockets) when left. */
export type Page = (main: HTMLElement, ...params: string[]) => Promise<(() => void) | void>;

const NAV: [string, string][] = [
  ["#/", "Sandboxes"],
  ["#/images", "Images"],
  ["#/volumes", "Volumes"],
  ["#/snapshots", "Snapshots"],
  ["#/pools", "Pools"],
  ["#/keys", "Keys"],
];

const ROUTES: [RegExp, Page][] = [
  [/^#?\/?$/, sandboxesPage],
  [/^#\/sandboxes\/(sb-[0-9a-z]+)$/, sandboxPage],
  [/^#\/images$/, imagesPage],
  [/^#\/volumes$/, volumesPage],
  [/^#\/snapshots$/, snapshotsPage],
  [/^#\/pools$/, poolsPage],
  [/^#\/keys$/, keysPage],
];

const app = document.getElementById("app")!;
let leave: (() => void) | void;

async function route(): Promise<void> {
  leave?.();
  leave = undefined;
  if (!key.get()) {
    login();
    return;
  }
  const hash = location.hash || "#/";
  const main = h("main", { id: "main", tabindex: -1 });
  show(app, frame(hash), main);
  const found = ROUTES.find(([pattern]) => pattern.test(hash));
  if (found === undefined) {
    show(main, h("h1", {}, "Not found"), h("p", {}, "Nothing is at this address. ", h("a", { href: "#/" }, "Back to the sandboxes")));
    return;
  }
  const [pattern, page] = found;
  const params = hash.match(pattern)!.slice(1);
  try {
    leave = await page(main, ...params);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    show(main, h("h1", {}, "Could not load this page"), h("p", { class: "notice error", role: "alert" }, message));
  }
}

function frame(hash: string): HTMLElement {
  const current = (href: string): string | undefined =>
    (href === "#/" ? hash === "#/" || hash.startsWith("#/sandboxes") : hash.startsWith(href)) ? "page" : undefined;
  return h(
    "header",
    {},
    h("a", { class: "brand", href: "#/" }, "Corral"),
    h(
      "nav",
      { "aria-label": "Main" },
      h("ul", {}, NAV.map(([href, label]) => h("li", {}, h("a", { href, "aria-current": current(href) }, label)))),
    ),
    h(
      "button",
      {
        type: "button",
        class: "secondary",
        onclick: () => {
          key.clear();
          location.hash = "#/";
          void route();
        },
      },
      "Log out",
    ),
  );
}

function login(): void {
  const status = h("p", { role: "status", class: "notice" });
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
    "aria-describedby": "api-key-help",
  });
  const form = h(
    "form",
    {
      class: "login",
      onsubmit: (event: Event) => {
        event.preventDefault();
        void guarded(status, async () => {
          const value = input.value.trim();
          const answer = await fetch("/v1/sandboxes?state=running", { headers: { Authorization: `Bearer ${value}` } });
          if (answer.status === 401) {
            throw new Error("That key was not accepted. Paste the key `corral serve` printed, or one from `corral keys create`.");
          }
          if (!answer.ok) throw new ApiError(answer.status, "http_error", `The server answered ${answer.status}; try again.`);
          key.set(value);
          await route();
        })();
      },
    },
    h("h1", {}, "Corral"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { id: "api-key-help", class: "help" }, "Kept in this browser tab only, until you close it or log out."),
    h("button", { type: "submit" }, "Log in"),
    status,
  );
  show(app, h("main", { id: "main" }, form));
  input.focus();
}

window.addEventListener("hashchange", () => void route());
window.addEventListener("corral:unauthorized", () => {
  key.clear();
  void route();
});
void route();

