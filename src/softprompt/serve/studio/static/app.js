// The studio's pages, routed by the URL's hash: #/prompts, #/prompt/NAME, #/playground, #/compare.
import { ApiError, auth, get, post, stream } from "./api.js";
import { lineChart } from "./charts.js";
import { card, fmt, h, heat, inkFor, kv, markdown, table } from "./ui.js";

const main = document.getElementById("main");
const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 2000;
let models = [];        // what GET /v1/models lists for this key (prompts and maybe "base")
let prompts = [];       // GET /v1/prompts rows
let cleanup = () => {};  // stops the current page's timers and requests
const show = (...nodes) => main.replaceChildren(...nodes.filter(Boolean));
const baseName = (b) => (b && b.startsWith("/") ? b.split("/").filter(Boolean).pop() : b);

const COLORS = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2"];

async function start() {
  try {
    models = (await get("/v1/models")).data.map((m) => m.id);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return login(auth.key ? "That key was refused." : "");
    return fail(e);
  }
  document.getElementById("nav").hidden = false;
  const who = document.getElementById("who");
  who.replaceChildren(auth.key ? h("button", { class: "link", id: "logout", onclick: () => { auth.key = ""; location.hash = "#/"; location.reload(); } }, "Log out") : h("span", { class: "muted" }, "open server"));
  window.addEventListener("hashchange", route);
  route();
}

function login(message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { id: "login-key", type: "password", placeholder: "sk-…", autocomplete: "off", autofocus: true });
  const submit = (ev) => { ev.preventDefault(); auth.key = input.value.trim(); show(); start(); };
  show(h("form", { class: "card login", id: "login", onsubmit: submit },
    h("h2", {}, "Sign in"),
    h("p", { class: "muted" }, "This server needs an API key. The studio uses it for every request, so it shows exactly the prompts the key may use."),
    h("label", { for: "login-key" }, "API key"), input,
    message ? h("p", { class: "error", id: "login-error" }, message) : null,
    h("button", { type: "submit" }, "Sign in")));
}

function fail(e) {
  show(card("Error", h("p", { class: "error" }, String(e.message || e))));
}

async function route() {
  cleanup(); cleanup = () => {};
  const [, page, ...rest] = (location.hash || "#/prompts").slice(1).split("?")[0].split("/");
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === (page === "prompt" ? "prompts" : page));
  show(h("p", { class: "muted" }, "Loading…"));
  try {
    if (page === "prompt") await promptPage(decodeURIComponent(rest.join("/")));
    else if (page === "playground") await playground();
    else if (page === "compare") await compare();
    else await promptsPage();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) login("The key was refused.");
    else fail(e);
  }
}

async function loadPrompts() { prompts = (await get("/v1/prompts")).data; return prompts; }

// -- Prompts ---------------------------------------------------------------------------------------
const COLUMNS = [
  ["name", "Prompt", (r) => h("a", { href: `#/prompt/${encodeURIComponent(r.name)}` }, r.name)],
  ["kind", "Kind", (r) => h("span", { class: `badge ${r.kind}` }, r.kind)],
  ["base", "Base model", (r) => h("span", { title: r.base }, baseName(r.base))],
  ["n_virtual", "Virtual tokens", (r) => fmt.int(r.n_virtual), "num"],
  ["params", "Parameters", (r) => fmt.int(r.params), "num"],
  ["bytes", "Bytes", (r) => fmt.bytes(r.bytes), "num"],
  ["task", "Task", (r) => r.task || "–"],
  ["steps", "Steps", (r) => fmt.int(r.steps), "num"],
  ["best", "Best dev", (r) => r.best_dev ? `${r.best_dev.name.replace("dev_", "")} ${fmt.num(r.best_dev.value, 3)}` : "–", "num"],
  ["modified", "Modified", (r) => fmt.date(r.modified), "num"],
];
const sortKey = (r, k) => k === "best" ? (r.best_dev ? r.best_dev.value : -Infinity) : r[k] ?? "";

async function promptsPage() {
  await loadPrompts();
  let sort = { key: "name", dir: 1 }, filter = "";
  const body = h("tbody");
  const head = h("tr", {}, COLUMNS.map(([k, label, , cls]) => h("th", { class: `sortable ${cls || ""}`, "data-key": k,
    onclick: () => { sort = { key: k, dir: sort.key === k ? -sort.dir : 1 }; draw(); } }, label)));
  const count = h("span", { class: "muted", id: "prompt-count" });
  const draw = () => {
    const f = filter.toLowerCase();
    const rows = prompts.filter((r) => !f || [r.name, r.kind, r.base, r.task].join(" ").toLowerCase().includes(f))
      .sort((a, b) => { const x = sortKey(a, sort.key), y = sortKey(b, sort.key); return (x > y ? 1 : x < y ? -1 : 0) * sort.dir; });
    body.replaceChildren(...rows.map((r) => h("tr", { "data-prompt": r.name },
      COLUMNS.map(([, , cell, cls]) => h("td", { class: cls || "" }, cell(r))))));
    for (const th of head.children) th.dataset.sort = th.dataset.key === sort.key ? (sort.dir > 0 ? "asc" : "desc") : "";
    count.textContent = `${rows.length} of ${prompts.length} prompts`;
  };
  const input = h("input", { id: "filter", type: "search", placeholder: "Filter by name, kind, base or task",
                             oninput: (e) => { filter = e.target.value; draw(); } });
  show(h("div", { class: "toolbar" }, h("h1", {}, "Prompts"), input, count),
    h("section", { class: "card flush" }, h("table", { class: "grid", id: "prompts-table" }, h("thead", {}, head), body)),
    prompts.length ? null : h("p", { class: "muted" }, "This key may use no prompts."));
  draw();
}

// -- A prompt --------------------------------------------------------------------------------------
function curves(points) {
  const train = points.filter((p) => p.type === "train" && p.loss !== undefined).map((p) => [p.step, p.loss]);
  const dev = points.filter((p) => p.type === "eval" && p.dev_loss !== undefined).map((p) => [p.step, p.dev_loss]);
  const acc = points.filter((p) => p.type === "eval" && p.dev_accuracy !== undefined).map((p) => [p.step, p.dev_accuracy]);
  const steps = points.map((p) => p.step).filter((x) => typeof x === "number");
  const xrange = steps.length ? [Math.min(...steps), Math.max(...steps)] : undefined;  // both charts share the steps axis
  const loss = lineChart({ id: "loss-chart", ylabel: "loss", height: 230, xrange, series: [
    { name: "train loss", points: train, color: COLORS[0] },
    { name: "dev loss", points: dev, color: COLORS[1], markers: true, line: dev.length > 1 }] });
  return h("div", { class: "charts" }, loss,
    acc.length ? lineChart({ id: "acc-chart", ylabel: "dev accuracy", height: 170, xrange, series: [{ name: "dev accuracy", points: acc, color: COLORS[2], markers: true }] }) : null);
}

function evalCard(ev, md) {
  if (!ev && !md) return null;
  if (!ev) return card("Evaluation", markdown(md));
  const rows = ev.results || [];
  const max = Math.max(1e-9, ...rows.map((r) => r.ci_high ?? r.score));
  const bar = (r) => h("div", { class: "bar" },
    h("div", { class: "fill", style: { width: `${(100 * r.score) / max}%` } }),
    h("div", { class: "ci", style: { left: `${(100 * r.ci_low) / max}%`, width: `${(100 * (r.ci_high - r.ci_low)) / max}%` } }));
  return card(`Evaluation${ev.title && ev.title !== "evaluation" ? ": " + ev.title : ""}`,
    table(["Contender", "Metric", "Score", "95% CI", "", "Loss", "n"], rows.map((r) => [
      r.name, r.metric, fmt.num(r.score, 4), `[${fmt.num(r.ci_low, 3)}, ${fmt.num(r.ci_high, 3)}]`, bar(r),
      fmt.num(r.loss, 4), fmt.int(r.n)]), { id: "eval-table" }));
}

function compressionCard(rep, md) {
  if (!rep && !md) return null;
  const head = rep ? kv([["context tokens", fmt.int(rep.context_tokens)], ["soft tokens", fmt.int(rep.soft_tokens)],
    ["compression", `${fmt.num(rep.compression_ratio, 1)}×`], ["held-out queries", fmt.int(rep.n_heldout)]]) : null;
  return card("Compression report", head, md ? markdown(md.replace(/^# Compression report\s*/, "")) : null);
}

const METRIC_NAMES = { cosine: "cosine", dot: "dot product", l2: "L2 distance" };

function nearestTable(nb, metric) {
  const k = nb.k, near = (x) => (metric === "l2" ? -x : x);  // an L2 score is a distance: lower is nearer
  const scores = nb.tokens.flatMap((t) => t[metric].slice(0, k).map((c) => near(c.score)));
  const lo = Math.min(...scores), hi = Math.max(...scores), pad = (hi - lo) * 0.1 || 0.05;
  const rows = nb.tokens.map((t) => h("tr", {},
    h("th", {}, `v${t.index}`), h("td", { class: "num" }, `${fmt.num(t.norm, 3)} (${Math.round(t.norm_percentile)}%)`),
    t[metric].slice(0, k).map((c) => h("td", { class: "heat", style: { background: heat(near(c.score), lo - pad, hi), color: inkFor(near(c.score), lo - pad, hi) },
                                               title: `${METRIC_NAMES[metric]} ${c.score.toFixed(3)}` }, h("code", {}, c.token || "∅"), h("small", {}, c.score.toFixed(2))))));
  return h("div", {},
    h("p", { class: "muted" }, `Darker is nearer (${METRIC_NAMES[metric]} from ${(metric === "l2" ? -hi : lo).toFixed(2)} to ${(metric === "l2" ? -lo : hi).toFixed(2)}).`),
    h("div", { class: "scroll" }, h("table", { class: "grid heatmap", id: "nearest-table", "data-metric": metric },
      h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "Norm (pct)"), Array.from({ length: k }, (_, i) => h("th", {}, `#${i + 1}`)))),
      h("tbody", {}, rows))));
}

function nearestCard(nb) {
  if (!nb) return null;
  const metrics = Object.keys(METRIC_NAMES).filter((m) => nb.tokens.length && nb.tokens[0][m]);
  const slot = h("div", {}, nearestTable(nb, metrics[0]));
  const pick = h("select", { id: "nearest-metric", onchange: (e) => slot.replaceChildren(nearestTable(nb, e.target.value)) },
    metrics.map((m) => h("option", { value: m }, METRIC_NAMES[m])));
  const v = nb.vocab_norms || {};
  return card("Nearest vocabulary tokens",
    h("div", { class: "row" }, h("label", { class: "field" }, h("span", {}, "Metric"), pick),
      h("p", { class: "muted grow" }, `Vocabulary embedding norms: median ${fmt.num(v.median, 3)}, 1st–99th percentile ${fmt.num(v.p1, 3)}–${fmt.num(v.p99, 3)}. `
        + "A virtual token far outside that range has no meaningful nearest word; the metrics often disagree (dot product favours large norms).")),
    slot);
}

function coverageCard(rows) {
  if (!rows || !rows.length) return null;
  return card("Coverage of the compressed context", h("p", { class: "muted" }, "Mean top-1 agreement with the full-context teacher, per part of the context."),
    table(["Part", "Queries", "Mean agreement"], rows.map((r) => [r.part, fmt.int(r.queries), fmt.pct(r.mean_agreement)]), { id: "coverage-table" }));
}

function fidelityCard(fid) {
  if (!fid) return null;
  const poor = fid.kl > 0.1 || fid.projected.value !== fid.soft.value;
  return card("Projection fidelity",
    h("p", { class: poor ? "warn" : "ok" }, poor ? "The projection does NOT behave like the soft prompt: the nearest tokens are not the prompt's meaning."
                                              : "The projection behaves like the soft prompt on these inputs."),
    kv([["projected prompt", h("code", {}, (fid.projected_tokens || []).join(""))],
        [`${fid.soft.metric} (soft)`, fmt.num(fid.soft.value, 4)], [`${fid.projected.metric} (projection)`, fmt.num(fid.projected.value, 4)],
        ["KL(soft ‖ projected)", `${fmt.num(fid.kl, 4)} nats/position`], ["top-1 agreement", fmt.pct(fid.top1_agreement)]]));
}

function hardenCard(hd) {
  if (!hd) return null;
  return card("Hardened prompts", h("p", { class: "muted" }, `Search with the ${hd.objective} objective, ${hd.steps} steps, ${hd.n_search} examples; reported on ${hd.n_report}.`),
    table(["Prompt", "Text in the soft slots", "KL", "Top-1 agreement", (hd.rows[0] || {}).metric || "metric"],
      hd.rows.map((r) => [r.name, h("code", {}, r.text), fmt.num(r.kl, 4), fmt.num(r.top1_agreement, 3), fmt.num(r.value, 4)]), { id: "harden-table" }));
}

async function promptPage(name) {
  const d = await get(`/v1/prompts/${encodeURIComponent(name)}/details`);
  const meta = d.meta || {}, tc = meta.train_config || {};
  const chartSlot = h("div", {}, curves(d.metrics));
  const live = h("span", { class: "live", id: "live" }, "");
  show(
    h("div", { class: "toolbar" }, h("h1", {}, name), h("span", { class: `badge ${d.kind}` }, d.kind),
      h("a", { class: "button", href: `#/playground?p=${encodeURIComponent(name)}` }, "Try in the playground")),
    h("div", { class: "two" },
      card("Metadata", kv([["template", h("code", {}, meta.template)], ["base model", h("span", { title: d.base }, baseName(d.base))], ["virtual tokens", fmt.int(d.n_virtual)],
        ["parameters", fmt.int(d.params)], ["size", fmt.bytes(d.bytes)], ["task", d.task], ["init", meta.init],
        ["steps", fmt.int(d.steps)], ["learning rate", tc.lr], ["batch size", tc.batch_size],
        ["best dev", d.best_dev ? `${d.best_dev.name} ${fmt.num(d.best_dev.value, 4)} (step ${d.best_dev.step})` : null],
        ["labels", meta.labels ? meta.labels.join(", ") : null], ["created", meta.created], ["modified", fmt.date(d.modified)]])),
      card(h("span", {}, "Training ", live), chartSlot)),
    evalCard(d.eval, d.eval_md), compressionCard(d.compression, d.compression_md),
    nearestCard(d.nearest), fidelityCard((d.inspect || {}).fidelity), coverageCard((d.inspect || {}).coverage), hardenCard(d.harden));
  // Poll the training log: the curve grows while softprompt train writes into the directory.
  let seen = d.metrics.length, stopped = false;
  const timer = setInterval(async () => {
    try {
      const m = (await get(`/v1/prompts/${encodeURIComponent(name)}/metrics`)).metrics;
      if (stopped) return;
      if (m.length !== seen) { seen = m.length; chartSlot.replaceChildren(curves(m)); live.textContent = "● live"; }
    } catch { /* the next poll retries */ }
  }, POLL_MS);
  cleanup = () => { stopped = true; clearInterval(timer); };
}

// -- Playground ------------------------------------------------------------------------------------
function params(form) {
  const num = (id) => form.querySelector(id).value.trim();
  const p = { temperature: Number(num("#temperature")), top_p: Number(num("#top-p")), max_tokens: Number(num("#max-tokens")) };
  if (num("#seed") !== "") p.seed = Number(num("#seed"));
  return p;
}

// A chat typed as lines "user: …", "assistant: …", "system: …" (text without a prefix is one user turn).
export function conversation(text) {
  const msgs = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^(user|assistant|system):\s?(.*)$/i);
    if (m) msgs.push({ role: m[1].toLowerCase(), content: m[2] });
    else if (msgs.length) msgs[msgs.length - 1].content += `\n${line}`;
    else msgs.push({ role: "user", content: line });
  }
  return msgs.map((m) => ({ ...m, content: m.content.trim() }));
}

const fill = (template, text) => (template.includes("{input}") ? template.replaceAll("{input}", text) : `${template}${text}`);

// One column's request: {model, prompt} for completions, {model, messages} for chat (the template of a
// hand-written prompt fills the last user turn, as a soft prompt's template does).
function request(col, text, chat) {
  const model = col.model === "hand-written" ? "base" : col.model;
  if (!chat) return { model, prompt: col.model === "hand-written" ? fill(col.template, text) : text };
  const messages = conversation(text);
  const last = messages[messages.length - 1];
  if (col.model === "hand-written" && last) last.content = fill(col.template, last.content);
  return { model, messages };
}

async function runColumn(col, text, chat, p, el, signal) {
  const out = el.querySelector(".out"), stats = el.querySelector(".stats");
  out.textContent = ""; el.dataset.state = "running"; el.dataset.chunks = 0; stats.textContent = "waiting…";
  const t0 = performance.now(); let ttft = null, usage = null;
  try {
    await stream(chat ? "/v1/chat/completions" : "/v1/completions", { ...request(col, text, chat), ...p }, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      const c = (chunk.choices || [])[0];
      const piece = c ? (chat ? (c.delta || {}).content : c.text) : "";
      if (piece) {
        if (ttft === null) ttft = performance.now() - t0;
        el.dataset.chunks = Number(el.dataset.chunks || 0) + 1;
        out.textContent += piece;
        stats.textContent = `streaming… TTFT ${ttft.toFixed(0)} ms`;
      }
    }, signal);
    const total = performance.now() - t0;
    stats.textContent = `${usage ? usage.completion_tokens : "?"} tokens · prompt ${usage ? usage.prompt_tokens : "?"} · TTFT ${ttft === null ? "–" : ttft.toFixed(0) + " ms"} · ${total.toFixed(0)} ms`;
    el.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") return;
    el.dataset.state = "error"; stats.textContent = ""; out.append(h("span", { class: "error" }, String(e.message || e)));
  }
}

async function playground() {
  await loadPrompts();
  const names = prompts.map((r) => r.name), hasBase = models.includes("base");
  const pre = new URLSearchParams(location.hash.split("?")[1] || "").get("p");
  const picks = [0, 1, 2, 3].map((i) => h("select", { class: "pick", id: `pick-${i}` }, h("option", { value: "" }, "—"),
    names.map((n) => h("option", { value: n, selected: (pre ? [pre][i] : names[i]) === n }, n))));
  const useBase = h("input", { type: "checkbox", id: "use-base", checked: hasBase, disabled: !hasBase });
  const useHand = h("input", { type: "checkbox", id: "use-hand", disabled: !hasBase });
  const hand = h("textarea", { id: "hand-template", rows: 2, disabled: !hasBase }, "Review: {input}\nSentiment:");
  const input = h("textarea", { id: "pg-input", rows: 3, placeholder: "The input every column gets" }, "a gorgeous, witty film");
  const chat = h("select", { id: "mode" }, h("option", { value: "completion" }, "completion"), h("option", { value: "chat" }, "chat"));
  const field = (label, el) => h("label", { class: "field" }, h("span", {}, label), el);
  const form = h("form", { class: "card controls", id: "pg-form" },
    h("div", { class: "row" }, field("Input (chat mode: a conversation as lines “user: …”, “assistant: …”, ending with the user's turn)", input)),
    h("div", { class: "row picks" }, picks.map((s, i) => field(`Prompt ${i + 1}`, s))),
    h("div", { class: "row" },
      h("label", { class: "check", title: hasBase ? "" : "this key may not use the bare model" }, useBase, " base model"),
      h("label", { class: "check" }, useHand, " hand-written prompt on base"), field("Hand-written template ({input} is the input)", hand)),
    h("div", { class: "row params" },
      field("Mode", chat), field("Temperature", h("input", { id: "temperature", type: "number", step: "0.1", min: 0, max: 2, value: 0 })),
      field("Top-p", h("input", { id: "top-p", type: "number", step: "0.05", min: 0.05, max: 1, value: 1 })),
      field("Max tokens", h("input", { id: "max-tokens", type: "number", min: 1, value: 24 })),
      field("Seed", h("input", { id: "seed", type: "number", placeholder: "none" })),
      h("button", { type: "submit", id: "run" }, "Run")));
  const grid = h("div", { class: "columns", id: "columns" });
  let ctl = null;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (ctl) ctl.abort();
    ctl = new AbortController();
    const cols = picks.map((s) => s.value).filter(Boolean).map((m) => ({ model: m }));
    if (useBase.checked) cols.push({ model: "base" });
    if (useHand.checked) cols.push({ model: "hand-written", template: hand.value });
    const p = params(form), text = input.value, isChat = chat.value === "chat";
    grid.replaceChildren(...cols.map((c, i) => h("div", { class: "column", "data-model": c.model, style: { borderTopColor: COLORS[i % COLORS.length] } },
      h("h3", {}, c.model), h("pre", { class: "out" }), h("div", { class: "stats muted" }))));
    cols.forEach((c, i) => runColumn(c, text, isChat, p, grid.children[i], ctl.signal));
  });
  cleanup = () => ctl && ctl.abort();
  show(h("div", { class: "toolbar" }, h("h1", {}, "Playground"),
    h("span", { class: "muted" }, "One input through up to four prompts, the bare model and a hand-written prompt, streamed side by side.")), form, grid);
}

// -- Compare ---------------------------------------------------------------------------------------
function parseJsonl(text) {
  return text.split("\n").map((l) => l.trim()).filter(Boolean).map((l) => JSON.parse(l));
}

async function compare() {
  await loadPrompts();
  const names = prompts.map((r) => r.name);
  const sel = (id, i) => h("select", { id }, names.map((n, j) => h("option", { value: n, selected: j === i }, n)));
  const a = sel("cmp-a", 0), b = sel("cmp-b", Math.min(1, names.length - 1));
  const simSlot = h("div", { id: "similarity" }), outSlot = h("div", { id: "dev-outputs" });
  const file = h("input", { type: "file", id: "dev-file", accept: ".jsonl,.json,.txt" });
  const limit = h("input", { type: "number", id: "dev-limit", value: 20, min: 1, max: 200 });
  const maxTok = h("input", { type: "number", id: "dev-max-tokens", value: 8, min: 1 });
  const field = (label, el) => h("label", { class: "field" }, h("span", {}, label), el);

  async function similarity() {
    simSlot.replaceChildren(h("p", { class: "muted" }, "…"));
    try {
      const s = await get(`/v1/prompts/${encodeURIComponent(a.value)}/similarity/${encodeURIComponent(b.value)}`);
      const m = s.cosine_matrix;
      const matrix = h("table", { class: "grid heatmap", id: "cosine-matrix" },
        h("thead", {}, h("tr", {}, h("th", {}, "A \\ B"), m[0].map((_, j) => h("th", {}, `v${j}`)))),
        h("tbody", {}, m.map((row, i) => h("tr", {}, h("th", {}, `v${i}`), row.map((x) =>
          h("td", { class: "heat", style: { background: heat(x, -1, 1), color: inkFor(x, -1, 1) } }, x.toFixed(2)))))));
      simSlot.replaceChildren(kv([["mean best-match cosine", fmt.num(s.mean_best_match, 3)], ["cosine of the mean vectors", fmt.num(s.mean_vector_cosine, 3)],
        ["mean position-wise cosine", s.mean_positionwise_cosine === undefined ? "– (different lengths)" : fmt.num(s.mean_positionwise_cosine, 3)],
        ["relative L2 distance", s.relative_l2 === undefined ? null : fmt.num(s.relative_l2, 3)]]),
        h("p", { class: "muted" }, `Cosine similarity of every virtual token of A (${s.a}, rows) with every virtual token of B (${s.b}, columns).`),
        h("div", { class: "scroll" }, matrix));
    } catch (e) { simSlot.replaceChildren(h("p", { class: "error" }, String(e.message || e))); }
  }

  async function outputs() {
    if (!file.files.length) { outSlot.replaceChildren(h("p", { class: "error" }, "Choose a dev file (.jsonl) first.")); return; }
    let rows;
    try { rows = parseJsonl(await file.files[0].text()).slice(0, Number(limit.value) || 20); }
    catch (e) { outSlot.replaceChildren(h("p", { class: "error" }, `Not JSON lines: ${e.message}`)); return; }
    const text = (r) => typeof r === "string" ? r : r.input ?? r.text ?? r.prompt ?? Object.values(r).find((v) => typeof v === "string") ?? "";
    const progress = h("p", { class: "muted", id: "dev-progress" }, `0 / ${rows.length}`);
    outSlot.replaceChildren(progress);
    const results = new Array(rows.length); let done = 0, next = 0;
    const one = async (model, input) => (await post("/v1/completions", { model, prompt: input, max_tokens: Number(maxTok.value) || 8, temperature: 0 })).choices[0].text;
    const worker = async () => {
      while (next < rows.length) {
        const i = next++, input = text(rows[i]);
        const [x, y] = await Promise.all([one(a.value, input), one(b.value, input)]);
        results[i] = { input, target: rows[i].target, a: x, b: y, same: x.trim() === y.trim() };
        progress.textContent = `${++done} / ${rows.length}`;
      }
    };
    try { await Promise.all([worker(), worker()]); } catch (e) { outSlot.replaceChildren(h("p", { class: "error" }, String(e.message || e))); return; }
    const order = results.map((r, i) => [r, i]).sort((p, q) => (p[0].same - q[0].same) || (p[1] - q[1]));
    const differ = results.filter((r) => !r.same).length;
    outSlot.replaceChildren(h("p", {}, `${differ} of ${results.length} outputs differ (greedy, ${maxTok.value} tokens); disagreements first.`),
      h("table", { class: "grid outputs", id: "dev-table" }, h("thead", {}, h("tr", {}, ["", "Input", "Target", a.value, b.value].map((c) => h("th", {}, c)))),
        h("tbody", {}, order.map(([r]) => h("tr", { class: r.same ? "same" : "differ" }, h("td", {}, r.same ? "=" : "≠"),
          h("td", {}, r.input), h("td", {}, r.target ?? ""), h("td", {}, h("pre", {}, r.a)), h("td", {}, h("pre", {}, r.b)))))));
  }

  a.addEventListener("change", similarity); b.addEventListener("change", similarity);
  show(h("div", { class: "toolbar" }, h("h1", {}, "Compare"), field("Prompt A", a), field("Prompt B", b)),
    card("Similarity per virtual token", simSlot),
    card("Outputs on a dev file", h("div", { class: "row params" }, field("Dev file (JSON lines with an input field)", file),
      field("Examples", limit), field("Max tokens", maxTok), h("button", { id: "run-dev", onclick: outputs }, "Run both")), outSlot));
  if (names.length) similarity();
}

start();
