// Copying text. navigator.clipboard exists only in secure contexts (https,
// localhost), and the page is often opened over plain http on a LAN address,
// where copying a selected, hidden textarea still works.

/** Put `text` on the clipboard; false when the browser refused. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // permission denied: the old way may still be allowed
    }
  }
  return copyWithSelection(text);
}

function copyWithSelection(text) {
  const focused = document.activeElement;
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  focused?.focus();
  return copied;
}
