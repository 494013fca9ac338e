// The status page: fetches /api/status every few seconds and renders it.
// Every value goes into the page as text (textContent), never as markup: reasons come from peers.
"use strict";

const WORKING = new Set(["receiving", "stable", "queued", "drafting", "drafted", "reported"]);
const STATE_CLASS = { sent: "ok", failed: "bad", skipped: "idle" };
let refreshSeconds = 3;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function stateBadge(state) {
  return el("span", state, "badge badge-" + (STATE_CLASS[state] || (WORKING.has(state) ? "work" : "idle")));
}

function clock(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  const today = new Date().toDateString() === d.toDateString();
  return today ? time : d.toISOString().slice(0, 10) + " " + time;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "";
  if (seconds < 10) return seconds.toFixed(1) + " s";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s";
  return (seconds / 3600).toFixed(1) + " h";
}

function after(start, end) {
  return end && start ? "+" + duration(end - start) : "";
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    if (cell instanceof Node) {
      const td = el("td");
      td.appendChild(cell);
      tr.appendChild(td);
    } else if (cell.clamp) {
      // long reasons: two lines here, all of it on hover (title is text too)
      const td = el("td", undefined, cell.className);
      const box = el("div", cell.text, "clamp");
      box.title = cell.text;
      td.appendChild(box);
      tr.appendChild(td);
    } else {
      tr.appendChild(el("td", cell.text, cell.className));
    }
  }
  return tr;
}

function fill(tableId, emptyId, rows) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren(...rows);
  document.getElementById(tableId).hidden = rows.length === 0;
  document.getElementById(emptyId).hidden = rows.length !== 0;
}

function renderHeader(data) {
  const n = data.node;
  document.getElementById("node").textContent =
    n.ae_title + " · DICOM port " + n.dicom_port + " · v" + n.version;
  const pill = document.getElementById("health");
  const failing = data.health.checks.filter((c) => !c.ok).map((c) => c.name);
  pill.textContent = failing.length ? "Unhealthy: " + failing.join(", ") : "Healthy";
  pill.className = "pill " + (failing.length ? "pill-bad" : "pill-ok");
  document.getElementById("updated").textContent =
    "updated " + clock(n.now) + " · every " + n.refresh_seconds + " s";
}

function renderCounts(counts) {
  const tiles = Object.entries(counts).map(([state, count]) => {
    const tile = el("div", undefined, "tile tile-" + (STATE_CLASS[state] || (WORKING.has(state) ? "work" : "idle")));
    tile.append(el("div", count, "tile-count"), el("div", state, "tile-label"));
    if (!count) tile.classList.add("tile-zero");
    return tile;
  });
  document.getElementById("counts").replaceChildren(...tiles);
}

function renderChecks(checks) {
  document.getElementById("checks").replaceChildren(...checks.map((c) => {
    const li = el("li", undefined, c.ok ? "check-ok" : "check-bad");
    li.append(el("span", "", "dot"), el("span", c.name, "check-name"), el("span", c.detail, "check-detail"));
    return li;
  }));
}

function renderQueue(data) {
  const facts = [
    ["Jobs waiting to be sent", data.queue.pending],
    ["Jobs queued at the broker", data.queue.queued],
    ["Drafts running", data.queue.drafting],
    ["Dead letters", data.outbox_counts.dead],
    ["Sends being retried", data.outbox_counts.retrying],
    ["Destinations", data.node.destinations.join(", ") || "none (drafts stay on the node)"],
  ];
  document.getElementById("queue").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
}

function renderStudies(data) {
  const now = data.node.now;
  fill("studies", "studies-empty", data.studies.map((s) => {
    const end = s.state === "sent" ? s.sent_at : null;
    let total = end ? duration(end - s.received_at) : "";
    if (!end && WORKING.has(s.state)) total = duration(now - s.received_at) + " so far";
    return row([
      { text: s.study, className: "mono" }, stateBadge(s.state),
      { text: s.revision, className: "num" }, { text: s.images, className: "num" },
      { text: clock(s.received_at) },
      { text: after(s.received_at, s.stable_at), className: "num" },
      { text: after(s.received_at, s.drafted_at), className: "num" },
      { text: after(s.received_at, s.sent_at), className: "num" },
      { text: total, className: "num strong" },
      { text: s.reason || "", className: "reason", clamp: true },
    ]);
  }));
}

function renderOutbox(data) {
  const now = data.node.now;
  fill("outbox", "outbox-empty", data.outbox.map((r) => {
    let next = "";
    if (r.next_attempt_at) next = r.next_attempt_at <= now ? "now" : "in " + duration(r.next_attempt_at - now);
    return row([
      { text: r.id, className: "num" }, { text: r.study, className: "mono" },
      { text: r.destination }, el("span", r.state === "dead" ? "dead letter" : r.state,
        "badge " + (r.state === "dead" ? "badge-bad" : "badge-work")),
      { text: r.attempts, className: "num" }, { text: next },
      { text: r.status || "", className: "mono" }, { text: r.reason || "", className: "reason" },
      { text: clock(r.updated_at) },
    ]);
  }));
}

const FEEDBACK_CLASS = { paired: "ok", waiting: "work", received: "work", ignored: "idle",
  superseded: "idle", unpaired: "bad" };

function score(value) {
  return value === null || value === undefined ? "–" : value.toFixed(3);
}

function renderFeedback(data) {
  const f = data.feedback;
  const r = f.rolling;
  const reports = r.reports;
  const misses = Object.entries(r["significant misses"]).map(([name, n]) => name + " " + n).join(", ");
  const facts = [
    ["Pairs in the window", r.pairs + " (last " + f.window.max_pairs + " pairs, " + f.window.days + " days)"],
    ["ROUGE-L (pycocoevalcap)", score(r["ROUGE-L"])],
    ["BLEU-2 (ReXrank)", score(r["BLEU-2"])],
    ["Label F1, 14 observations (micro / macro)", score(r["label F1 micro (14)"]) + " / " + score(r["label F1 macro (14)"])],
    ["Label F1, 5 common (micro / macro)", score(r["label F1 micro (5 common)"]) + " / " + score(r["label F1 macro (5 common)"])],
    ["Pairs with a significant miss", r["significant miss share"] === null ? "–"
      : Math.round(100 * r["significant miss share"]) + " %" + (misses ? " (" + misses + ")" : "")],
    ["Waiting for a draft / unpaired / ignored", reports.waiting + " / " + reports.unpaired + " / " + reports.ignored],
  ];
  document.getElementById("agreement").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  fill("feedback", "feedback-empty", f.recent.map((p) => row([
    { text: p.study || "–", className: "mono" }, { text: p.source },
    el("span", p.state, "badge badge-" + (FEEDBACK_CLASS[p.state] || "idle")),
    { text: clock(p.received_at) }, { text: (p.model || "") + (p.demo && !/DEMO/.test(p.model || "") ? " (DEMO)" : "") },
    { text: score(p["ROUGE-L"]), className: "num" }, { text: score(p["BLEU-2"]), className: "num" },
    { text: score(p["label F1"]), className: "num" },
    { text: p["significant misses"].join(", "), className: p["significant misses"].length ? "strong" : "" },
    { text: p.reason || "", className: "reason", clamp: true },
  ])));
}

async function refresh() {
  const banner = document.getElementById("offline");
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    refreshSeconds = data.node.refresh_seconds || refreshSeconds;
    renderHeader(data);
    renderCounts(data.counts);
    renderChecks(data.health.checks);
    renderQueue(data);
    renderStudies(data);
    renderOutbox(data);
    renderFeedback(data);
    banner.hidden = true;
  } catch (error) {
    banner.textContent = "Cannot reach the node (" + error.message + "); showing the last data received.";
    banner.hidden = false;
  } finally {
    setTimeout(refresh, refreshSeconds * 1000);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
