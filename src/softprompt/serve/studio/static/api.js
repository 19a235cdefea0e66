// The server's own HTTP API, called with the user's key: the studio sees what the key may use.
const KEY = "softprompt.studio.key";

export const auth = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set key(k) { k ? sessionStorage.setItem(KEY, k) : sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (auth.key) h.Authorization = `Bearer ${auth.key}`;
  return h;
}

async function check(resp) {
  if (resp.ok) return resp;
  let msg = `${resp.status} ${resp.statusText}`;
  try { msg = (await resp.json()).error.message || msg; } catch { /* not JSON */ }
  throw new ApiError(resp.status, msg);
}

export async function get(path) {
  return (await check(await fetch(path, { headers: headers() }))).json();
}

export async function post(path, body, signal) {
  const resp = await fetch(path, { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                   body: JSON.stringify(body), signal });
  return (await check(resp)).json();
}

// POST with stream: true; calls onEvent(chunk) for every server-sent event until [DONE].
export async function stream(path, body, onEvent, signal) {
  const resp = await check(await fetch(path, {
    method: "POST", headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }), signal,
  }));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        onEvent(chunk);
      }
    }
  }
}
