"use strict";
// The knowledge-base page: one form, the JSON API, and DOM built with textContent only (no HTML from data).

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const message = data && data.message ? data.message : `HTTP ${response.status}`;
    throw new Error(`${path}: ${message}`);
  }
  return data;
}

function parseTurns(text) {
  const turns = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const m = /^(user|assistant)\s*:\s*(.*)$/i.exec(line);
    if (m) turns.push({role: m[1].toLowerCase(), text: m[2] || "…"});
    else turns.push({role: "user", text: line});
  }
  return turns;
}

function metric(label, value, title) {
  const box = el("div", "metric");
  box.title = title;
  box.append(el("span", "label", label), el("b", "", value));
  return box;
}

function renderDiagnostics(data) {
  const strip = $("diagnostics");
  strip.replaceChildren();
  const top = data.diagnostics.top_hit;
  if (top) {
    strip.append(
      metric("top hit: entropy", `${fmt(top.entropy)} nats · ${fmt(top.normalized_entropy)} of max`,
             "entropy of the top hit's chunk weights; 1 of max = uniform, 0 = one chunk"),
      metric("top hit: effective N", `${fmt(top.effective_n, 1)} of ${top.n} chunks`,
             "1 / sum(w²): how many chunks carry the weight"));
  }
  strip.append(
    metric("all hits: mean normalized entropy", fmt(data.diagnostics.mean_normalized_entropy),
           "mean over the hits with at least two chunks"),
    metric("all hits: mean effective N", fmt(data.diagnostics.mean_effective_n, 1), "mean over the hits"),
    metric("temperature", fmt(data.temperature, 3), "softmax temperature over a document's chunks"),
    metric("method", data.method, "document pooling used for ranking"),
    metric("time", `${fmt(data.took_ms, 0)} ms`, "server time of the search"));
  if (data.turn_pooling) {
    strip.append(
      metric("turns: entropy", `${fmt(data.turn_pooling.normalized_entropy)} of max`, "entropy of the turn weights"),
      metric("turns: effective N", `${fmt(data.turn_pooling.effective_n, 1)} of ${data.turn_pooling.n}`,
             "1 / sum(w²) over the turn weights"));
  }
  strip.hidden = false;
}

function renderHit(hit, rank) {
  const item = el("li", "hit");
  item.dataset.docId = hit.doc_id;
  const head = el("div", "hit-head");
  head.append(el("span", "rank", `${rank}.`), el("span", "title", hit.title || hit.doc_id),
              el("span", "doc-id", hit.doc_id), el("span", "score", `score ${fmt(hit.score, 4)}`),
              el("span", "pooling", `entropy ${fmt(hit.pooling.normalized_entropy)} · effective N ` +
                                    `${fmt(hit.pooling.effective_n, 1)} of ${hit.pooling.n}`));
  item.append(head);
  const signals = Object.entries(hit.signals || {});
  if (signals.length) {
    // a hybrid: where each of its signals ranked this document, so disagreements show
    const line = el("div", "signals", "ranks: " + signals.map(([name, s]) =>
      `${name} #${s.rank} (${fmt(s.score, 3)})`).join(" · "));
    line.title = "the document's rank (1 = best) and score under each signal the hybrid fuses";
    item.append(line);
  }
  const maxWeight = Math.max(...hit.chunks.map((c) => c.weight), 1e-12);
  const heat = el("div", "heat");
  heat.title = "every chunk of the document, in order; darker = more attention weight";
  for (const c of hit.chunks) {
    const cell = el("span");
    cell.style.opacity = String(0.08 + 0.92 * c.weight / maxWeight);
    const bm25 = c.lexical == null ? "" : `, BM25 ${fmt(c.lexical, 2)}`;
    cell.title = `chunk ${c.index}: weight ${fmt(c.weight, 3)}, cosine ${fmt(c.similarity, 3)}${bm25}, chars ${c.start}-${c.end}`;
    heat.append(cell);
  }
  item.append(heat);
  const shown = hit.chunks.filter((c) => c.text).sort((a, b) => b.weight - a.weight);
  for (const c of shown) {
    const chunk = el("div", "chunk");
    chunk.dataset.weight = String(c.weight);
    chunk.style.background = `rgba(var(--heat), ${(0.06 + 0.5 * c.weight / maxWeight).toFixed(3)})`;
    const bm25 = c.lexical == null ? "" : ` · BM25 ${fmt(c.lexical, 2)}`;
    chunk.append(el("span", "weight", `chunk ${c.index} · weight ${fmt(c.weight, 3)} · cosine ` +
                                      `${fmt(c.similarity, 3)}${bm25} · chars ${c.start}–${c.end}`));
    chunk.append(document.createTextNode(c.text.replace(/\s+/g, " ").trim()));
    item.append(chunk);
  }
  return item;
}

function renderTurns(turns, weights, message, messageWeight) {
  const list = $("turn-weights");
  list.replaceChildren();
  const rows = [...turns.map((t, i) => [t.role, t.text, weights[i]]), ["current", message, messageWeight]];
  const maxWeight = Math.max(...rows.map((r) => r[2]), 1e-12);
  for (const [role, text, w] of rows) {
    const row = el("li");
    const bar = el("span", "turn-bar");
    bar.style.width = `${Math.round(4 + 120 * w / maxWeight)}px`;
    row.append(bar, el("span", "role", `${role}:`), el("span", "", text), el("span", "muted", ` — weight ${fmt(w, 3)}`));
    list.append(row);
  }
}

function renderPassages(data) {
  $("passages-summary").textContent = `${data.passages.length} passages, ${data.tokens} of ${data.budget} tokens ` +
                                      `(${fmt(data.took_ms, 0)} ms)`;
  const maxWeight = Math.max(...data.passages.map((p) => p.weight), 1e-12);
  $("passages").replaceChildren(...data.passages.map((p) => {
    const item = el("li", "chunk");
    item.dataset.docId = p.doc_id;
    item.style.background = `rgba(var(--heat), ${(0.06 + 0.5 * p.weight / maxWeight).toFixed(3)})`;
    item.append(el("span", "weight", `${p.doc_id} · chunk ${p.index} · weight ${fmt(p.weight, 3)} · ` +
                                     `${p.num_tokens} tokens · chars ${p.start}–${p.end}`));
    item.append(document.createTextNode(p.text.replace(/\s+/g, " ").trim()));
    return item;
  }));
}

async function search(event) {
  if (event) event.preventDefault();
  const query = $("query").value;
  if (!query.trim()) { showError("query: expected a non-empty question"); return; }
  const turns = parseTurns($("turns").value);
  let method = $("method").value;
  // a conversation is pooled into one query vector, which has no words for BM25: its search is by attention
  if (turns.length && lexicalMethods.includes(method)) method = "attention";
  const common = {method, k: Number($("k").value) || 10, top_chunks: 3};
  showError("");
  document.body.dataset.state = "busy";
  try {
    const data = turns.length
      ? await api("/api/history/search", {turns, message: query, ...common})
      : await api("/api/explain", {query, ...common});
    $("results").replaceChildren(...data.hits.map((hit, i) => renderHit(hit, i + 1)));
    renderDiagnostics(data);
    if (data.turn_weights) renderTurns(turns, data.turn_weights, query, data.message_weight);
    else $("turn-weights").replaceChildren();
    if ($("passages-pane").open) {
      renderPassages(await api("/api/passages", {query, budget: Number($("budget").value) || 512,
                                                 diversity: Number($("diversity").value)}));
    }
    document.body.dataset.state = "results";
  } catch (err) {
    showError(err.message);
    document.body.dataset.state = "error";
  }
}

let lexicalMethods = [];

async function init() {
  $("search-form").addEventListener("submit", search);
  try {
    const info = await api("/api/info");
    lexicalMethods = info.lexical_methods;
    $("store-info").textContent = `${info.documents} documents, ${info.chunks} chunks · ${info.model_id} ` +
                                  `(${info.dim}-d) · ${info.store}`;
    $("method").replaceChildren(...info.methods.map((m) => {
      const option = el("option", "", m);
      option.selected = m === info.default_method;
      return option;
    }));
    $("query").maxLength = info.limits.query_chars;
    document.body.dataset.state = "ready";
  } catch (err) {
    showError(err.message);
  }
}

init();
