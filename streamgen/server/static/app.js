// streamgen's browser client: the page's state, and what each user action and
// server message does to it. WebSocket protocol v1 (docs/protocol.md). No
// build step: ES modules and vendored libraries, served as they are.
import { describeBuild } from "./build.js";
import { copyText } from "./clipboard.js";
import { Connection } from "./connection.js";
import { element, NO_KEYBOARD_HINTS, PHONE } from "./dom.js";
import * as store from "./store.js";
import {
  flash, isSendKey, onChatAction, onConversationAction, renderAnswerFooter, renderConversation,
  renderConversationList, renderStreamedText, scrollToLatest, showEditor,
} from "./view.js";

const $ = (id) => document.getElementById(id);
const WS_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed"];
const TITLE_CHARS = 60;
const PLACEHOLDER = "Ask something…";
const KEYBOARD_HINTS = " (Enter sends, Shift+Enter new line, Escape stops)";

const state = {
  conversations: store.loadConversations(),
  active: null,     // the conversation on screen; a new one joins `conversations` with its first message
  request: null,    // the answer being streamed: {id, conversation, message, started, firstAt, frame}
  nextId: 1,
  jaegerUrl: null,  // from /v1/models; null when the server links no trace viewer
  apiKey: store.loadApiKey(),
};

const connection = new Connection(WS_URL, { onMessage: handle, onState: connectionChanged });

// ---- conversations ---------------------------------------------------------------

function openConversation(conversation) {
  state.active = conversation;
  store.saveActiveId(conversation.id);
  render();
  showSidebar(false);
}

function render() {
  document.title = state.active.title ? `${state.active.title} · streamgen` : "streamgen";
  renderConversationList(state.conversations, state.active.id);
  renderConversation(state.active, {
    streaming: state.request?.message ?? null, busy: state.request !== null, jaegerUrl: state.jaegerUrl,
  });
  updateButtons();
}

function persist() {
  if (!store.saveConversations(state.conversations)) {
    showNotice("The browser's storage is full: delete old conversations to keep new ones.");
  }
}

function newChat() {
  if (state.active.messages.length > 0) openConversation(store.newConversation());
  $("prompt").focus();
}

function deleteConversation(id) {
  const conversation = state.conversations.find((c) => c.id === id);
  if (!conversation || !confirm(`Delete the conversation "${conversation.title}"?`)) return;
  if (state.request?.conversation === conversation) stop();
  state.conversations = state.conversations.filter((c) => c !== conversation);
  persist();
  if (state.active === conversation) openConversation(newestConversation() ?? store.newConversation());
  else render();
}

function newestConversation() {
  return [...state.conversations].sort((a, b) => b.updated - a.updated)[0];
}

// Another tab saved its conversations: take its list, so that the next save
// here does not drop what was added there. The conversation being answered in
// this tab stays as it is here until its answer is done.
function adoptConversationsFromAnotherTab() {
  const answering = state.request?.conversation;
  state.conversations = store.loadConversations().map((c) => (c.id === answering?.id ? answering : c));
  state.active = state.conversations.find((c) => c.id === state.active.id) ?? state.active;
  render();
}

// An answer that was streaming when the page closed never got its `done`.
function markInterrupted() {
  for (const message of state.conversations.flatMap((c) => c.messages)) {
    if (message.role === "assistant" && !message.meta?.finish) {
      message.meta = { ...message.meta, finish: "interrupted" };
    }
  }
}

// ---- asking ---------------------------------------------------------------------

function submitPrompt(ev) {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || !readyToSend()) return;
  addUserTurn(state.active, text);
  $("prompt").value = "";
  startAnswer(state.active);
}

function readyToSend() {
  if (state.request) return false;
  if (connection.isOpen) return true;
  showNotice("Not connected; the page reconnects by itself, try again in a moment.");
  return false;
}

function addUserTurn(conversation, text) {
  if (!state.conversations.includes(conversation)) state.conversations.push(conversation);
  if (!conversation.title) conversation.title = text.replace(/\s+/g, " ").slice(0, TITLE_CHARS);
  conversation.messages.push({ role: "user", content: text });
}

function startAnswer(conversation) {
  const id = `r${state.nextId++}`;
  // "truncate": the server drops the oldest turns when the conversation has
  // outgrown the model's context, so a long chat goes on.
  connection.send({ type: "generate", id, messages: requestMessages(conversation), params: readParams(),
                    truncate: "oldest" });
  const message = { role: "assistant", content: "", meta: { tokens: 0 } };
  conversation.messages.push(message);
  conversation.updated = Date.now();
  state.request = { id, conversation, message, started: performance.now(), firstAt: null, frame: 0 };
  resetStats();
  hideNotice();
  announce("Answering…");
  persist();
  render();
  scrollToLatest();
}

function requestMessages(conversation) {
  const system = $("system").value.trim();
  // An answer that failed before its first token has nothing to tell the model.
  const turns = conversation.messages.filter((m) => m.content !== "").map(({ role, content }) => ({ role, content }));
  return [...(system ? [{ role: "system", content: system }] : []), ...turns];
}

function readParams() {
  const params = {
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    top_k: Math.max(0, parseInt($("top_k").value || "0", 10)),
    max_tokens: Math.max(1, parseInt($("max_tokens").value || "256", 10)),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") params.seed = parseInt(seed, 10);
  return params;
}

function stop() {
  if (state.request) connection.send({ type: "cancel", id: state.request.id });
}

function regenerate() {
  if (!readyToSend() || state.active.messages.at(-1)?.role !== "assistant") return;
  state.active.messages.pop();
  startAnswer(state.active);
}

function sendEdited(index, text) {
  const edited = text.trim();
  if (!edited || !readyToSend()) return;
  state.active.messages.splice(index);  // the old turn and the answer to it
  if (index === 0) state.active.title = "";
  addUserTurn(state.active, edited);
  startAnswer(state.active);
}

// ---- messages from the server -----------------------------------------------------

function handle(msg) {
  const request = state.request;
  if (msg.type === "pong") return;
  if (!request || msg.id !== request.id) {
    if (msg.type === "error") showNotice(`${msg.code}: ${msg.message}`);
    return;
  }
  ON_SERVER_MESSAGE[msg.type]?.(request, msg);
}

const ON_SERVER_MESSAGE = {
  start(request, msg) {
    Object.assign(request.message.meta, { traceId: msg.trace_id ?? null, truncated: msg.truncated_messages ?? 0 });
    if (onScreen(request)) renderAnswerFooter(indexOf(request), request.message.meta, state.jaegerUrl);
  },
  token(request, msg) {
    request.firstAt ??= performance.now();
    request.message.meta.tokens += 1;
    request.message.content += msg.text;
    showLiveStats(request);
    scheduleFrame(request);
  },
  done(request, msg) {
    request.message.content += msg.tail || "";
    finish(request, { finish: msg.finish_reason, usage: msg.usage, timings: msg.timings, seed: msg.seed });
  },
  error(request, msg) {
    finish(request, { finish: `error: ${msg.code}`, error: `${msg.code}: ${msg.message}` });
  },
};

function finish(request, meta) {
  cancelAnimationFrame(request.frame);
  Object.assign(request.message.meta, meta);
  request.conversation.updated = Date.now();
  state.request = null;
  showFinalStats(request.message.meta);
  announce(finishSentence(request.message.meta));
  persist();
  render();
}

function finishSentence({ finish, tokens }) {
  const how = { stop: "done", length: "stopped at the token limit", cancelled: "cancelled" }[finish] ?? finish;
  return `Answer ${how}, ${tokens} token${tokens === 1 ? "" : "s"}.`;
}

// Tokens can come faster than the screen refreshes: the answer's Markdown is
// rendered at most once a frame.
function scheduleFrame(request) {
  if (request.frame) return;
  request.frame = requestAnimationFrame(() => {
    request.frame = 0;
    if (onScreen(request)) renderStreamedText(indexOf(request), request.message.content);
  });
}

function onScreen(request) {
  return request.conversation === state.active;
}

function indexOf(request) {
  return request.conversation.messages.indexOf(request.message);
}

function connectionChanged(kind, text) {
  const status = $("status");
  status.dataset.state = kind;
  status.textContent = text;
  if (kind === "closed" && state.request) {
    finish(state.request, { finish: "connection lost", error: "The connection dropped before the answer was done." });
  }
  updateButtons();
}

// ---- copying ----------------------------------------------------------------------

async function copy(text, button) {
  const copied = await copyText(text);
  flash(button, copied ? "Copied" : "Copy failed");
  announce(copied ? "Copied to the clipboard." : "The browser did not allow copying.");
}

// ---- the stats line, notices, the live region ------------------------------------------

function resetStats() {
  for (const id of ["ttft", "tps", "finish"]) $(id).textContent = "–";
  $("tokens").textContent = "0";
}

function showLiveStats(request) {
  const tokens = request.message.meta.tokens;
  $("tokens").textContent = String(tokens);
  $("ttft").textContent = `${Math.round(request.firstAt - request.started)} ms`;
  if (tokens > 1) $("tps").textContent = ((tokens - 1) / ((performance.now() - request.firstAt) / 1000)).toFixed(1);
}

// The server's own figures replace the page's estimates once they arrive.
function showFinalStats(meta) {
  const t = meta.timings;
  $("tokens").textContent = String(meta.tokens ?? 0);
  $("finish").textContent = meta.finish;
  if (Number.isFinite(t?.decode_tokens_per_s)) $("tps").textContent = t.decode_tokens_per_s.toFixed(1);
  if (Number.isFinite(t?.time_to_first_token_ms)) $("ttft").textContent = `${Math.round(t.time_to_first_token_ms)} ms`;
}

// After a reload the line shows the figures of the latest answer the page kept
// (each answer's meta holds them), rather than dashes.
function showStoredStats() {
  const newestFirst = [...state.conversations].sort((a, b) => b.updated - a.updated);
  for (const conversation of newestFirst) {
    const answer = conversation.messages.findLast((m) => m.role === "assistant" && m.meta?.finish);
    if (answer) return showFinalStats(answer.meta);
  }
}

function showNotice(text) {
  $("notice-text").textContent = text;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

function announce(text) {
  $("announcer").textContent = text;
}

function updateButtons() {
  $("send").disabled = !connection.isOpen || state.request !== null;
  $("stop").disabled = state.request === null;
}

// ---- the sidebar on narrow screens ----------------------------------------------

function sidebarOpen() {
  return document.body.classList.contains("sidebar-open");
}

function showSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("sidebar-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("new-chat").focus();
}

function closeSidebar() {
  showSidebar(false);
  $("sidebar-toggle").focus();
}

function onEscape() {
  if (settingsOpen()) closeSettings();
  else if (sidebarOpen()) closeSidebar();
  else stop();
}

// ---- the settings on phones: a dialog over the chat ------------------------------------

function settingsOpen() {
  return document.body.classList.contains("settings-open");
}

function showSettings(open) {
  document.body.classList.toggle("settings-open", open);
  $("settings-toggle").setAttribute("aria-expanded", String(open));
  if (open) {
    $("settings").querySelector("details").open = true;
    $("settings-close").focus();
  }
}

function closeSettings() {
  showSettings(false);
  $("settings-toggle").focus();
}

// A modal dialog on phones, a column beside the chat on wider screens.
function placeSettings() {
  const aside = $("settings");
  if (PHONE.matches) {
    aside.setAttribute("role", "dialog");
    aside.setAttribute("aria-modal", "true");
  } else {
    aside.removeAttribute("role");
    aside.removeAttribute("aria-modal");
    if (settingsOpen()) showSettings(false);
  }
}

// Tab and Shift+Tab go round the open dialog's controls instead of leaving it.
function keepFocusInSettings(ev) {
  if (ev.key !== "Tab" || !settingsOpen() || !PHONE.matches) return;
  const controls = [...$("settings").querySelectorAll("button, summary, input, textarea")]
    .filter((el) => el.offsetParent !== null);
  const first = controls[0];
  const last = controls.at(-1);
  if (ev.shiftKey && document.activeElement === first) {
    ev.preventDefault();
    last.focus();
  } else if (!ev.shiftKey && document.activeElement === last) {
    ev.preventDefault();
    first.focus();
  }
}

// Keyboard hints only where there is a keyboard to speak of.
function showPlaceholder() {
  $("prompt").placeholder = PLACEHOLDER + (NO_KEYBOARD_HINTS.matches ? "" : KEYBOARD_HINTS);
}

// ---- settings, API key, model info -------------------------------------------------

// Only the settings a user changed are kept, so that a new server default
// reaches everyone who left that setting alone. Pages before that kept every
// value, the old sampling defaults (temperature 0.7, top-p 1) included: those
// two, found in such a store, were never a choice and are dropped.
const OLD_DEFAULTS = { temperature: "0.7", top_p: "1" };

function restoreSettings() {
  const saved = store.loadSettings();
  const everyValue = SETTINGS.every((id) => id in saved);
  for (const id of SETTINGS) {
    if (typeof saved[id] !== "string" || (everyValue && OLD_DEFAULTS[id] === saved[id])) continue;
    $(id).value = saved[id];
  }
  showSliderValues();
}

function saveSettings() {
  const changed = SETTINGS.filter((id) => $(id).value !== $(id).defaultValue);
  store.saveSettings(Object.fromEntries(changed.map((id) => [id, $(id).value])));
  showSliderValues();
}

function resetSettings() {
  for (const id of SETTINGS) $(id).value = $(id).defaultValue;
  saveSettings();
}

function showSliderValues() {
  for (const id of ["temperature", "top_p"]) $(`${id}-value`).textContent = $(id).value;
}

function saveKey(ev) {
  ev.preventDefault();
  state.apiKey = $("api-key").value.trim();
  store.saveApiKey(state.apiKey);
  $("key-form").hidden = true;
  connection.reopen(state.apiKey);
  loadModelInfo();
}

async function loadModelInfo() {
  try {
    const res = await fetch("/v1/models", { headers: state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {} });
    if (res.status === 401) {
      $("key-form").hidden = false;
      $("model").textContent = "this server needs an API key";
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    const entry = body.data[0];
    const { label, title } = describeBuild(entry);
    const build = element("span", "build", label);
    build.id = "build";
    build.title = title;
    const rest = ` · ${entry.device} · context ${entry.context_length}`;
    $("model").replaceChildren(`${entry.id} · `, build, rest);
    $("model").title = `${entry.id} · ${label}${rest}`;  // the whole line, where a phone cuts it short
    state.jaegerUrl = body.ui?.jaeger_url ?? null;
    if (state.jaegerUrl) render();  // answers already on screen get their trace links
  } catch {
    $("model").textContent = "model not ready yet";
    setTimeout(loadModelInfo, 2000);
  }
}

// ---- wiring ------------------------------------------------------------------------

function bindControls() {
  $("composer").addEventListener("submit", submitPrompt);
  $("prompt").addEventListener("keydown", (ev) => {
    if (isSendKey(ev)) submitPrompt(ev);
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("sidebar-toggle").addEventListener("click", () => showSidebar(!sidebarOpen()));
  $("sidebar-close").addEventListener("click", closeSidebar);
  $("dismiss-notice").addEventListener("click", hideNotice);
  $("key-form").addEventListener("submit", saveKey);
  $("settings").addEventListener("input", saveSettings);
  $("reset-settings").addEventListener("click", resetSettings);
  $("settings-toggle").addEventListener("click", () => (settingsOpen() ? closeSettings() : showSettings(true)));
  $("settings-close").addEventListener("click", closeSettings);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") onEscape();
    keepFocusInSettings(ev);
  });
  // On a narrow screen a tap outside the open list or settings closes them. (The
  // path, not the target: a delete button is gone from the page once its click is handled.)
  document.addEventListener("click", (ev) => {
    const inside = (...ids) => ev.composedPath().some((el) => ids.includes(el.id));
    if (sidebarOpen() && !inside("sidebar", "sidebar-toggle")) showSidebar(false);
    if (settingsOpen() && !inside("settings", "settings-toggle")) showSettings(false);
  });
  PHONE.addEventListener("change", placeSettings);
  NO_KEYBOARD_HINTS.addEventListener("change", () => {
    showPlaceholder();
    render();  // the empty conversation's hint
  });
  onConversationAction({
    open: (id) => openConversation(state.conversations.find((c) => c.id === id)),
    delete: deleteConversation,
  });
  onChatAction({
    copy: (index, button) => copy(state.active.messages[index].content, button),
    copyCode: (button) => copy(button.closest(".code-block").querySelector("code").textContent, button),
    regenerate,
    edit: (index) => showEditor(index, state.active.messages[index].content),
    editSend: sendEdited,
    editCancel: render,
  });
  store.onSavedInAnotherTab(adoptConversationsFromAnotherTab);
}

function main() {
  restoreSettings();
  markInterrupted();
  const saved = state.conversations.find((c) => c.id === store.loadActiveId());
  openConversation(saved ?? store.newConversation());
  showStoredStats();
  showPlaceholder();
  placeSettings();
  bindControls();
  loadModelInfo();
  connection.open(state.apiKey);
}

main();
