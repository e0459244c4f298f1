// The DOM of conversations: the list in the sidebar and the messages of the
// open one. It draws what it is given and reports clicks to the handlers
// app.js binds; what it remembers lives in the DOM.
import { answerFooter } from "./answer.js";
import { element, NO_KEYBOARD_HINTS } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const chat = document.getElementById("chat");
const list = document.getElementById("conversations");

// ---- the conversation list ------------------------------------------------------

export function renderConversationList(conversations, activeId) {
  const newestFirst = [...conversations].sort((a, b) => b.updated - a.updated);
  list.replaceChildren(...newestFirst.map((c) => conversationItem(c, c.id === activeId)));
}

function conversationItem(conversation, active) {
  const title = conversation.title || "New chat";
  const open = actionButton(title, "open-conversation", null, "ghost open");
  if (active) open.setAttribute("aria-current", "page");
  const remove = actionButton("×", "delete-conversation", `Delete conversation: ${title}`, "ghost delete");
  const item = document.createElement("li");
  item.dataset.id = conversation.id;
  item.append(open, remove);
  return item;
}

/** handlers.open(id), handlers.delete(id). */
export function onConversationAction(handlers) {
  list.addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (!button) return;
    const id = button.closest("li").dataset.id;
    if (button.dataset.action === "open-conversation") handlers.open(id);
    else handlers.delete(id);
  });
}

// ---- the messages -----------------------------------------------------------------

/**
 * Draw every message of `conversation`. context: {streaming: the answer being
 * streamed, or null; busy: whether a request is in flight; jaegerUrl}.
 */
export function renderConversation(conversation, context) {
  const messages = conversation.messages;
  const lastUser = messages.findLastIndex((m) => m.role === "user");
  const lastAnswer = messages.at(-1)?.role === "assistant" ? messages.length - 1 : -1;
  const items = messages.map((message, index) => messageElement(message, index, {
    ...context,
    editable: !context.busy && index === lastUser,
    regenerable: !context.busy && index === lastAnswer,
  }));
  // Redrawing the conversation on screen leaves a reader who scrolled up where they are.
  const keepPlace = chat.dataset.conversation === conversation.id && !atBottom();
  const top = chat.scrollTop;
  chat.replaceChildren(...(items.length > 0 ? items : [emptyHint()]));
  chat.scrollTop = keepPlace ? top : chat.scrollHeight;
  chat.dataset.conversation = conversation.id;
}

/** Redraw the streamed answer's text; a reader who scrolled up is left where they are. */
export function renderStreamedText(index, text) {
  const body = chat.querySelector(`.msg[data-index="${index}"] .body`);
  if (!body) return;
  const follow = atBottom();
  renderMarkdown(body, text);
  if (follow) chat.scrollTop = chat.scrollHeight;
}

/** Scroll to the newest message (the user just sent one). */
export function scrollToLatest() {
  chat.scrollTop = chat.scrollHeight;
}

function atBottom() {
  return chat.scrollHeight - chat.scrollTop - chat.clientHeight < 48;
}

/** Redraw the footer of the answer at `index` (e.g. when `start` says turns were dropped). */
export function renderAnswerFooter(index, meta, jaegerUrl) {
  const footer = chat.querySelector(`.msg[data-index="${index}"] .footer`);
  if (footer) footer.replaceChildren(...answerFooter(meta, jaegerUrl));
}

function messageElement(message, index, context) {
  const article = document.createElement("article");
  article.className = `msg ${message.role}`;
  article.dataset.index = String(index);
  const body = element("div", "body");
  article.append(body);
  if (message.role === "user") {
    article.setAttribute("aria-label", "your message");
    body.textContent = message.content;  // what the user typed is shown as typed, never as HTML
    if (context.editable) article.append(actions(actionButton("Edit", "edit", "Edit and resend your message")));
    return article;
  }
  article.setAttribute("aria-label", "answer");
  const streaming = message === context.streaming;
  article.classList.toggle("streaming", streaming);
  article.classList.toggle("error", Boolean(message.meta?.error));
  if (streaming) article.setAttribute("aria-busy", "true");
  renderMarkdown(body, message.content);
  const footer = element("div", "footer");
  footer.append(...answerFooter(message.meta || {}, context.jaegerUrl));
  article.append(footer);
  if (!streaming) article.append(answerActions(context.regenerable));
  return article;
}

function answerActions(regenerable) {
  const buttons = [actionButton("Copy", "copy", "Copy answer")];
  if (regenerable) buttons.push(actionButton("Regenerate", "regenerate", "Regenerate answer"));
  return actions(...buttons);
}

function emptyHint() {
  const keys = NO_KEYBOARD_HINTS.matches ? "" : " Enter sends, Shift+Enter starts a new line, Escape stops an answer.";
  return element("p", "empty", `Ask something. Answers render Markdown with highlighted code.${keys}`);
}

// ---- editing the last user turn --------------------------------------------------

/** Replace the user message at `index` with an editor holding `text`. */
export function showEditor(index, text) {
  const article = chat.querySelector(`.msg[data-index="${index}"]`);
  const form = element("form", "editor");
  const area = document.createElement("textarea");
  area.value = text;
  area.rows = Math.min(10, text.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit your message");
  const send = element("button", "", "Send");
  send.type = "submit";
  send.setAttribute("aria-label", "Send the edited message");
  form.append(area, actions(send, actionButton("Cancel", "edit-cancel", "Cancel editing", "secondary")));
  article.replaceChildren(form);
  area.focus();
}

/**
 * handlers.copy(index, button), regenerate(), edit(index), copyCode(button),
 * editSend(index, text), editCancel(). In the editor, Enter sends,
 * Shift+Enter starts a new line and Escape cancels.
 */
export function onChatAction(handlers) {
  const byAction = {
    copy: (button) => handlers.copy(indexOf(button), button),
    regenerate: () => handlers.regenerate(),
    edit: (button) => handlers.edit(indexOf(button)),
    "copy-code": (button) => handlers.copyCode(button),
    "edit-cancel": () => handlers.editCancel(),
  };
  chat.addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (button) byAction[button.dataset.action](button);
  });
  chat.addEventListener("submit", (ev) => {
    ev.preventDefault();
    handlers.editSend(indexOf(ev.target), ev.target.querySelector("textarea").value);
  });
  chat.addEventListener("keydown", (ev) => {
    if (!ev.target.closest(".editor")) return;
    if (ev.key === "Escape") {
      ev.stopPropagation();  // Escape here leaves the editor; it is not the page's "stop the answer"
      handlers.editCancel();
    } else if (isSendKey(ev)) {
      ev.preventDefault();
      ev.target.form.requestSubmit();
    }
  });
}

/** Enter without Shift, and not while an input method is composing a character. */
export function isSendKey(ev) {
  return ev.key === "Enter" && !ev.shiftKey && !ev.isComposing;
}

/** Show `text` on a button for a moment (e.g. "Copied"), then its own label again. */
export function flash(button, text) {
  button.dataset.label ??= button.textContent;  // a second click while flashing keeps the real label
  button.textContent = text;
  clearTimeout(Number(button.dataset.timer));
  button.dataset.timer = String(setTimeout(() => { button.textContent = button.dataset.label; }, 1500));
}

// ---- small helpers ---------------------------------------------------------------

function indexOf(el) {
  return Number(el.closest(".msg").dataset.index);
}

function actions(...buttons) {
  const bar = element("div", "actions");
  bar.append(...buttons);
  return bar;
}

function actionButton(text, action, ariaLabel, className = "ghost") {
  const button = element("button", className, text);
  button.type = "button";
  button.dataset.action = action;
  if (ariaLabel) button.setAttribute("aria-label", ariaLabel);
  return button;
}
