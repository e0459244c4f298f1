// streamgen browser client: WebSocket protocol v1 (docs/protocol.md), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const WS_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;

const state = {
  socket: null,
  retryMs: 500,          // reconnection back-off, doubled up to 8 s
  history: [],           // [{role, content}] of the finished turns
  current: null,         // the request being streamed: {id, el, text, started, firstAt, tokens, traceId}
  nextId: 1,
  jaegerUrl: null,       // from /v1/models; links each answer to its trace
  apiKey: localStorage.getItem("streamgen.apiKey") || "",  // sent as a subprotocol (browsers cannot set WS headers)
  opened: false,         // whether the current socket ever opened (a refused handshake never does)
};

// ---- connection ----------------------------------------------------------------

function connect() {
  setStatus("connecting", "connecting");
  const protocols = ["streamgen.v1", ...(state.apiKey ? [`bearer.${state.apiKey}`] : [])];
  const socket = new WebSocket(WS_URL, protocols);
  state.socket = socket;
  state.opened = false;
  socket.onopen = () => {
    state.opened = true;
    state.retryMs = 500;
    setStatus("open", "connected");
    updateButtons();
  };
  socket.onmessage = (ev) => handle(JSON.parse(ev.data));
  socket.onclose = () => {
    if (state.current) finish({ finish_reason: "connection lost" }, true);
    const why = state.opened ? "disconnected" : "refused (API key or origin?)";
    setStatus("closed", `${why}, retrying in ${(state.retryMs / 1000).toFixed(1)} s`);
    updateButtons();
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 8000);
  };
}

function send(message) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify(message));
    return true;
  }
  return false;
}

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

// ---- messages from the server ------------------------------------------------

function handle(msg) {
  const cur = state.current;
  if (msg.type === "pong") return;
  if (!cur || msg.id !== cur.id) {
    if (msg.type === "error") addMessage("error", `${msg.code}: ${msg.message}`);
    return;
  }
  switch (msg.type) {
    case "start":
      cur.promptTokens = msg.prompt_tokens;
      cur.traceId = msg.trace_id || null;
      showTrace(cur.traceId);
      break;
    case "token":
      if (cur.firstAt === null) {
        cur.firstAt = performance.now();
        $("ttft").textContent = `${Math.round(cur.firstAt - cur.started)} ms`;
      }
      cur.tokens += 1;
      appendText(msg.text);
      $("tokens").textContent = String(cur.tokens);
      if (cur.tokens > 1) {
        const rate = (cur.tokens - 1) / ((performance.now() - cur.firstAt) / 1000);
        $("tps").textContent = rate.toFixed(1);
      }
      break;
    case "done":
      appendText(msg.tail || "");
      finish(msg, false);
      break;
    case "error":
      cur.el.classList.add("error");
      appendText(`\n[${msg.code}] ${msg.message}`);
      finish({ finish_reason: `error: ${msg.code}` }, true);
      break;
  }
}

function appendText(text) {
  if (!text) return;
  const cur = state.current;
  cur.text += text;
  cur.body.textContent = cur.text;
  scrollDown();
}

function finish(msg, failed) {
  const cur = state.current;
  if (!cur) return;
  cur.el.classList.remove("streaming");
  $("finish").textContent = msg.finish_reason;
  if (msg.timings) {
    $("tps").textContent = msg.timings.decode_tokens_per_s.toFixed(1);
    $("ttft").textContent = `${Math.round(msg.timings.time_to_first_token_ms)} ms`;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${msg.usage.completion_tokens} tokens · ${msg.finish_reason} · ` +
      `${msg.timings.decode_tokens_per_s.toFixed(1)} tok/s · seed ${msg.seed}`;
    cur.el.appendChild(meta);
  }
  if (cur.traceId) cur.el.appendChild(traceLink(cur.traceId));
  // Keep the turn in the conversation unless it failed before producing text.
  if (!failed || cur.text) {
    state.history.push({ role: "user", content: cur.prompt });
    state.history.push({ role: "assistant", content: cur.text });
  }
  state.current = null;
  updateButtons();
}

function traceLink(traceId, label = `trace ${traceId}`) {
  const el = document.createElement(state.jaegerUrl ? "a" : "span");
  el.className = "trace";
  el.textContent = label;
  el.dataset.traceId = traceId;
  if (state.jaegerUrl) {
    el.href = `${state.jaegerUrl.replace(/\/$/, "")}/trace/${traceId}`;
    el.target = "_blank";
    el.rel = "noopener";
  }
  return el;
}

function showTrace(traceId) {
  $("trace").replaceChildren(traceId ? traceLink(traceId, traceId.slice(0, 16) + "…") : document.createTextNode("–"));
}

// ---- sending -----------------------------------------------------------------

function params() {
  const p = {
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    top_k: Math.max(0, parseInt($("top_k").value || "0", 10)),
    max_tokens: Math.max(1, parseInt($("max_tokens").value || "256", 10)),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") p.seed = parseInt(seed, 10);
  return p;
}

function submit(ev) {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.current) return;
  const system = $("system").value.trim();
  const messages = [
    ...(system ? [{ role: "system", content: system }] : []),
    ...state.history,
    { role: "user", content: prompt },
  ];
  const id = `r${state.nextId++}`;
  if (!send({ type: "generate", id, messages, params: params() })) {
    addMessage("error", "not connected; the page reconnects by itself, try again in a moment");
    return;
  }
  addMessage("user", prompt);
  const el = addMessage("assistant streaming", "");
  state.current = { id, el, body: el.querySelector(".body"), prompt, text: "", started: performance.now(),
                    firstAt: null, tokens: 0 };
  $("prompt").value = "";
  for (const k of ["ttft", "tps", "finish", "trace"]) $(k).textContent = "–";
  $("tokens").textContent = "0";
  updateButtons();
}

function stop() {
  if (state.current) send({ type: "cancel", id: state.current.id });
}

function clearChat() {
  if (state.current) stop();
  state.history = [];
  $("chat").replaceChildren();
}

// ---- view helpers ------------------------------------------------------------

function addMessage(kind, text) {
  const el = document.createElement("div");
  el.className = `msg ${kind}`;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  el.appendChild(body);
  $("chat").appendChild(el);
  scrollDown();
  return el;
}

function scrollDown() {
  const chat = $("chat");
  chat.scrollTop = chat.scrollHeight;
}

function updateButtons() {
  const open = state.socket && state.socket.readyState === WebSocket.OPEN;
  $("send").disabled = !open || state.current !== null;
  $("stop").disabled = state.current === null;
}

function authHeaders() {
  return state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
}

function saveKey(ev) {
  ev.preventDefault();
  state.apiKey = $("api-key").value.trim();
  localStorage.setItem("streamgen.apiKey", state.apiKey);
  $("key-form").hidden = true;
  if (state.socket) state.socket.close();  // reconnects with the key
  loadModelInfo();
}

async function loadModelInfo() {
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    if (res.status === 401) {
      $("key-form").hidden = false;
      $("model").textContent = "this server needs an API key";
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    const m = body.data[0];
    state.jaegerUrl = (body.ui && body.ui.jaeger_url) || null;
    $("model").textContent = `${m.id} · ${m.quantization} · ${m.device} · context ${m.context_length}`;
  } catch (err) {
    $("model").textContent = "model not ready yet";
    setTimeout(loadModelInfo, 2000);
  }
}

for (const id of ["temperature", "top_p"]) {
  $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
}
$("composer").addEventListener("submit", submit);
$("key-form").addEventListener("submit", saveKey);
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) submit(ev);
});
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", clearChat);
if (window.matchMedia("(max-width: 700px)").matches) document.querySelector("#settings details").open = false;

loadModelInfo();
connect();
