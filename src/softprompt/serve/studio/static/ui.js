// Small DOM helpers: every text goes in as a text node (never as HTML).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, v);
  append(el, children);
  return el;
}

export const fmt = {
  num(x, d = 4) { return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d); },
  int(x) { return x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US"); },
  bytes(n) {
    if (!n && n !== 0) return "–";
    const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
  },
  date(t) {
    if (!t) return "–";
    const d = new Date(t * 1000);
    const p = (x) => String(x).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
  },
  pct(x) { return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`; },
};

export function card(title, ...body) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...body);
}

export function kv(rows) {
  return h("table", { class: "kv" }, h("tbody", {}, rows.filter((r) => r[1] !== undefined && r[1] !== null && r[1] !== "")
    .map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
}

export function table(head, rows, attrs = {}) {
  return h("table", { class: "grid", ...attrs }, h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

// A colour from white to the accent for a similarity in [lo, hi].
export function heat(x, lo = 0, hi = 1) {
  const t = Math.max(0, Math.min(1, (x - lo) / (hi - lo || 1)));
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(247, 37)}, ${mix(248, 99)}, ${mix(250, 235)})`;
}

export function inkFor(x, lo = 0, hi = 1) { return (x - lo) / (hi - lo || 1) > 0.55 ? "#fff" : "#1f2937"; }

// Markdown as the project writes it (headings, paragraphs, lists, pipe tables, code fences), as text nodes.
export function markdown(src) {
  const out = h("div", { class: "md" });
  const lines = (src || "").split("\n");
  for (let i = 0; i < lines.length;) {
    const line = lines[i];
    if (line.startsWith("```")) {
      const body = []; i++;
      while (i < lines.length && !lines[i].startsWith("```")) body.push(lines[i++]);
      i++; out.append(h("pre", {}, body.join("\n"))); continue;
    }
    if (line.startsWith("|")) {
      const rows = [];
      while (i < lines.length && lines[i].startsWith("|")) rows.push(lines[i++]);
      const cells = (r) => r.replace(/^\||\|$/g, "").split("|").map((c) => inline(c.trim()));
      out.append(table(cells(rows[0]), rows.slice(2).map(cells))); continue;
    }
    const m = line.match(/^(#{1,4})\s+(.*)/);
    if (m) { out.append(h(`h${Math.min(6, m[1].length + 2)}`, {}, inline(m[2]))); i++; continue; }
    if (line.startsWith("- ")) {
      const items = [];
      while (i < lines.length && lines[i].startsWith("- ")) items.push(h("li", {}, inline(lines[i++].slice(2))));
      out.append(h("ul", {}, items)); continue;
    }
    if (line.trim()) {
      const para = [];
      while (i < lines.length && lines[i].trim() && !/^(#|\||- |```)/.test(lines[i])) para.push(lines[i++]);
      out.append(h("p", {}, inline(para.join(" ")))); continue;
    }
    i++;
  }
  return out;
}

function inline(text) {
  return text.split(/(`[^`]*`|\*\*[^*]*\*\*)/).filter(Boolean).map((part) =>
    part.startsWith("`") ? h("code", {}, part.slice(1, -1)) :
    part.startsWith("**") ? h("strong", {}, part.slice(2, -2)) : document.createTextNode(part));
}
