// Model output as HTML: Markdown by marked, code coloured by highlight.js, and
// everything passed through DOMPurify before it reaches the page, because a
// model can be talked into writing any HTML at all.
import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.js";
import hljs from "./vendor/highlight.js/highlight.min.js";
import { element } from "./dom.js";

const markdown = new Marked({
  gfm: true,
  breaks: true,  // models end a line where they mean a line break
  renderer: { code: renderCode },
});

// Links in an answer leave the page without giving it a handle on them.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// What an answer may contain: HTML for text and nothing more. Nothing that
// loads from elsewhere (an image URL can carry the conversation away), no
// styles that could cover the page, no form controls that could pass for the
// page's own, no ids or names that would shadow the page's elements.
const SANITIZE = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["img", "picture", "video", "audio", "source", "style", "form", "input", "button", "textarea", "select"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOW_DATA_ATTR: false,
};

/** Render `text` as sanitized Markdown into `target`, replacing what was there. */
export function renderMarkdown(target, text) {
  target.innerHTML = DOMPurify.sanitize(toHtml(text), SANITIZE);
  for (const pre of target.querySelectorAll("pre")) addCodeHeader(pre);
}

function toHtml(text) {
  try {
    return markdown.parse(text);
  } catch {
    // marked gives up on some pathological inputs; show the text rather than nothing.
    return `<p>${escapeHtml(text)}</p>`;
  }
}

const LANGUAGE_NAME = /^[a-z0-9_+#.-]{1,32}$/;

// Only a named language is highlighted: guessing one on every streamed frame
// is slow, and the guess flickers while the block grows.
function renderCode({ text, lang }) {
  const language = (lang || "").trim().split(/\s+/)[0].toLowerCase();
  const known = LANGUAGE_NAME.test(language) && hljs.getLanguage(language) !== undefined;
  const html = known ? hljs.highlight(text, { language, ignoreIllegals: true }).value : escapeHtml(text);
  return `<pre><code class="hljs${known ? ` language-${language}` : ""}">${html}</code></pre>\n`;
}

// A bar above each code block with its language and a copy button (the
// chat's click handler finds it by data-action).
function addCodeHeader(pre) {
  const language = pre.querySelector("code")?.className.match(/\blanguage-(\S+)/)?.[1];
  const copy = element("button", "ghost", "Copy");
  copy.type = "button";
  copy.dataset.action = "copy-code";
  copy.setAttribute("aria-label", language ? `Copy ${language} code` : "Copy code");
  const head = element("div", "code-head");
  head.append(element("span", "", language || "code"), copy);
  const block = element("div", "code-block");
  pre.replaceWith(block);
  block.append(head, pre);
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
