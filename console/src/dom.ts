// Building the page: elements from data, never from HTML strings (every name, path and
// metadata value shown comes from a tenant), and the small formats the pages share.

export type Child = Node | string | number | null | undefined | false;
type Attributes = Record<string, string | number | boolean | EventListener | undefined>;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attributes: Attributes = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === false) continue;
    if (typeof value === "function") element.addEventListener(name.replace(/^on/, ""), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

function append(parent: Node, children: (Child | Child[])[]): void {
  for (const child of children) {
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.appendChild(child);
    else if (child !== null && child !== undefined && child !== false) parent.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace what `parent` shows. */
export function show(parent: Element, ...children: (Child | Child[])[]): void {
  parent.replaceChildren();
  append(parent, children);
}

export function age(seconds: number): string {
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

export function bytes(value: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value < 10 && unit > 0 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

export function when(seconds: number): string {
  return new Date(seconds * 1000).toLocaleString();
}

const SVG = "http://www.w3.org/2000/svg";

/** A sparkline of `values` (oldest first), labelled for screen readers with the last value. */
export function sparkline(values: number[], label: string, max?: number): SVGSVGElement {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 100 24");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const top = Math.max(max ?? 0, ...values, 1e-9);
  if (values.length > 0) {
    const step = values.length > 1 ? 100 / (values.length - 1) : 0;
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(23 - (v / top) * 22).toFixed(1)}`);
    if (values.length === 1) points.push(`100,${points[0]!.split(",")[1]}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.appendChild(line);
  }
  return svg;
}

/** A status line that screen readers announce: errors in red, the rest plain. */
export function notice(where: Element, message: string, error = false): void {
  show(where, message);
  where.className = error ? "notice error" : "notice";
}

/** Run `action` for a button, showing its error (and keeping the page) if it fails. */
export function guarded(status: Element, action: () => Promise<unknown>): () => Promise<void> {
  return async () => {
    try {
      notice(status, "");
      await action();
    } catch (error) {
      notice(status, error instanceof Error ? error.message : String(error), true);
    }
  };
}

export function table(headings: string[], rows: (Child | Child[])[][], caption: string): HTMLTableElement {
  return h(
    "table",
    {},
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, headings.map((title) => h("th", { scope: "col" }, title)))),
    h(
      "tbody",
      {},
      rows.length ? rows.map((cells) => h("tr", {}, cells.map((cell) => h("td", {}, cell)))) : h("tr", {}, h("td", { colspan: headings.length }, "None yet.")),
    ),
  );
}
