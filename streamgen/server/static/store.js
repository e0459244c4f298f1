// What the page keeps in localStorage: the conversations (the server keeps
// none), which one was open, the settings and the API key.
//
// A conversation is {id, title, updated, messages}; a message is
// {role: "user"|"assistant", content, meta?}, where an answer's meta holds the
// figures of the request that produced it (see answer.js).

const KEYS = {
  conversations: "streamgen.conversations",
  active: "streamgen.activeConversation",
  settings: "streamgen.settings",
  apiKey: "streamgen.apiKey",
};

export function loadConversations() {
  const list = readJson(KEYS.conversations, []);
  return Array.isArray(list) ? list.filter(isConversation) : [];
}

/** Save every conversation; false when the browser's storage is full. */
export function saveConversations(conversations) {
  try {
    localStorage.setItem(KEYS.conversations, JSON.stringify(conversations));
    return true;
  } catch {
    return false;
  }
}

/** Call `callback` when another tab of this page saves the conversations. */
export function onSavedInAnotherTab(callback) {
  window.addEventListener("storage", (ev) => {
    if (ev.key === KEYS.conversations) callback();
  });
}

/** The conversation that was open, to open it again on the next visit. */
export function loadActiveId() {
  return localStorage.getItem(KEYS.active);
}

export function saveActiveId(id) {
  localStorage.setItem(KEYS.active, id);
}

export function newConversation() {
  // Not crypto.randomUUID: it exists only in secure contexts, and the page is
  // often served over plain http on a LAN address.
  const id = `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  return { id, title: "", updated: Date.now(), messages: [] };
}

export function loadSettings() {
  const settings = readJson(KEYS.settings, {});
  return settings && typeof settings === "object" ? settings : {};
}

export function saveSettings(settings) {
  localStorage.setItem(KEYS.settings, JSON.stringify(settings));
}

export function loadApiKey() {
  return localStorage.getItem(KEYS.apiKey) || "";
}

export function saveApiKey(key) {
  localStorage.setItem(KEYS.apiKey, key);
}

function readJson(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;  // written by an older page, or by hand: start over rather than fail to load
  }
}

function isConversation(c) {
  return c && typeof c.id === "string" && Array.isArray(c.messages) &&
    c.messages.every((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
}
