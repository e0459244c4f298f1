// What the page shows under an answer: how it ended, where its time went, and
// a link to its trace. Every figure is the request's own, from its `start` and
// `done` messages, kept in the answer's meta:
//   {finish, tokens, truncated, traceId, error, usage, timings, seed}
// usage and timings are the `done` message's objects as they came, so a figure
// the server does not send (cached_tokens, prefill_tokens on older servers) is
// simply not shown.
import { element } from "./dom.js";

// What each phase is, for the tooltips of its bar segment and figure and for
// the legend. All four are the server's own clock (the `done` message's
// timings), from the request's arrival at the server to its last token: the
// network and this page's work are in none of them. "other" is what remains of
// the time to first token after queue and prefill (timingView below).
const PHASES = {
  queue: "waiting for a free slot in the engine",
  prefill: "the forward passes that ran this prompt (the part not reused from the cache)",
  other: "the rest of the time to first token: picking the first token, turning it into text, and the work " +
    "the same engine steps did for other requests",
  decode: "from the first token to the last: the rest of the answer",
};
const MEASURED = "Measured by the server, from the request's arrival to its last token; " +
  "the network and this page's work are in none of the phases.";

/** The footer's elements for one answer's meta (possibly none yet). */
export function answerFooter(meta, jaegerUrl) {
  const parts = [];
  if (meta.truncated > 0) parts.push(truncationNote(meta.truncated));
  if (meta.error) parts.push(element("p", "error-text", meta.error));
  if (meta.finish) parts.push(metaLine(meta, jaegerUrl));
  if (meta.timings) parts.push(timingView(meta.timings, meta.usage || {}));
  return parts;
}

function truncationNote(count) {
  const messages = count === 1 ? "message was" : `${count} messages were`;
  return element("p", "note", `The oldest ${messages} left out to fit the model's context.`);
}

function metaLine(meta, jaegerUrl) {
  const tokens = meta.usage?.completion_tokens ?? meta.tokens ?? 0;
  const bits = [meta.finish, `${tokens} token${tokens === 1 ? "" : "s"}`];
  if (meta.seed !== undefined) bits.push(`seed ${meta.seed}`);
  const line = element("div", "meta", bits.join(" · "));
  // Without a Jaeger UI a trace id leads nowhere, so none is shown.
  if (jaegerUrl && meta.traceId) line.append(" · ", traceLink(jaegerUrl, meta.traceId));
  return line;
}

function traceLink(jaegerUrl, traceId) {
  const link = element("a", "trace", `trace ${traceId.slice(0, 8)}`);
  link.href = `${jaegerUrl.replace(/\/$/, "")}/trace/${traceId}`;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  link.title = `trace ${traceId} in Jaeger`;
  link.dataset.traceId = traceId;
  return link;
}

// A bar split into the phases of the request, and the figures beside it.
// Time to first token is queue + prefill + a little more (tokenizing, the
// first sample, delivery): that remainder gets its own segment when it is big
// enough to see.
function timingView(t, usage) {
  const decodeMs = Math.max(0, t.total_ms - t.time_to_first_token_ms);
  const otherMs = Math.max(0, t.time_to_first_token_ms - t.queue_ms - t.prefill_ms);
  const phases = [
    { name: "queue", ms: t.queue_ms, figure: ms(t.queue_ms) },
    { name: "prefill", ms: t.prefill_ms, figure: prefillFigure(t) },
    ...(otherMs >= 1 ? [{ name: "other", ms: otherMs, figure: ms(otherMs) }] : []),
    { name: "decode", ms: decodeMs, figure: `${ms(decodeMs)} · ${rate(t.decode_tokens_per_s)}` },
  ];
  const view = element("div", "timing");
  view.append(timingBar(phases, t.total_ms), figures(phases, t, usage), legend(phases));
  return view;
}

// prefill_tokens (the prompt tokens actually run, the rest came from the
// cache) is shown when the server sends it. No rate: a prefill of a few tokens
// after a cache hit costs a whole forward pass, and its "tokens per second"
// would mislead.
function prefillFigure(t) {
  return Number.isFinite(t.prefill_tokens) ? `${ms(t.prefill_ms)} · ${t.prefill_tokens} tok` : ms(t.prefill_ms);
}

function timingBar(phases, totalMs) {
  const bar = element("div", "bar");
  bar.setAttribute("role", "img");
  const spoken = phases.map((p) => `${p.name} ${ms(p.ms)}`).join(", ");
  bar.setAttribute("aria-label", `time of this answer: ${spoken}; total ${ms(totalMs)}`);
  for (const phase of phases) {
    const segment = element("span", `segment ${phase.name}`);
    segment.style.flexGrow = String(Math.max(0, phase.ms) || 0);
    segment.title = `${phase.name} ${ms(phase.ms)}: ${PHASES[phase.name]}`;
    bar.append(segment);
  }
  return bar;
}

// The tooltips' text where no pointer can show a tooltip (touch screens): folded under the figures.
function legend(phases) {
  const details = element("details", "legend");
  details.append(element("summary", "", "What the phases mean"));
  const list = element("dl");
  for (const phase of phases) {
    const term = element("dt", "", phase.name);
    term.prepend(element("span", `swatch ${phase.name}`));
    list.append(term, element("dd", "", PHASES[phase.name]));
  }
  details.append(list, element("p", "", MEASURED));
  return details;
}

function figures(phases, t, usage) {
  const list = element("dl", "figures");
  for (const phase of phases) list.append(figure(phase.name, phase.figure, phase.name, PHASES[phase.name]));
  list.append(figure("first token", ms(t.time_to_first_token_ms)));
  list.append(figure("prompt", promptFigure(usage)));
  list.append(figure("completion", `${usage.completion_tokens ?? "?"} tok`));
  return list;
}

function promptFigure(usage) {
  const tokens = `${usage.prompt_tokens ?? "?"} tok`;
  return Number.isFinite(usage.cached_tokens) ? `${tokens} · ${usage.cached_tokens} cached` : tokens;
}

function figure(name, value, swatch, help) {
  const item = element("div", "figure");
  const term = element("dt", "", name);
  if (swatch) term.prepend(element("span", `swatch ${swatch}`));
  if (help) term.title = help;
  item.append(term, element("dd", "", value));
  return item;
}

// Short figures: 0.4 ms, 42 ms, 342 ms, 3.27 s, 12.4 s.
function ms(value) {
  if (!Number.isFinite(value)) return "–";
  if (value >= 1000) return `${(value / 1000).toFixed(value >= 10000 ? 1 : 2)} s`;
  return `${value >= 10 ? Math.round(value) : value.toFixed(1)} ms`;
}

function rate(tokensPerSecond) {
  return Number.isFinite(tokensPerSecond) && tokensPerSecond > 0 ? `${tokensPerSecond.toFixed(1)} tok/s` : "– tok/s";
}
