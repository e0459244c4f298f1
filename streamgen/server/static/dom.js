// The DOM helpers the modules share.

/** A new `tag` element with an optional class list and text. */
export function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Phones: the settings become a dialog over the chat (style.css's max-width: 700px block). */
export const PHONE = window.matchMedia("(max-width: 700px)");

/** Where keyboard hints (Enter, Shift+Enter, Escape) mean nothing: touch screens and phone widths. */
export const NO_KEYBOARD_HINTS = window.matchMedia("(max-width: 700px), (pointer: coarse)");
