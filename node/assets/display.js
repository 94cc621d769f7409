// Bazaar live display: a jackpot counting up, its recent winners with a
// check of each hit against its commitment, and a leaderboard's top 10.
//
// The display key comes from the URL fragment (#key=...), which browsers
// never send to a server, and travels only as an Authorization header of
// streaming fetch() requests, so no server or proxy logs it. Streams
// reconnect by themselves with the last event id, getting the current state
// first and then what they missed.
"use strict";

const params = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));
const tenant = decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");
const key = fragment.get("key");
const jackpotId = params.get("jackpot");
const leaderboardId = params.get("leaderboard");
const api = `/v1/tenants/${encodeURIComponent(tenant)}`;
const headers = { Authorization: `Bearer ${key}` };
let money = (minor) => (minor / 100).toFixed(2);

function $(id) { return document.getElementById(id); }

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

// ---- money and the pool's count-up ----------------------------------------

async function loadTenant() {
  const response = await fetch(api, { headers });
  if (!response.ok) return;
  const tenantInfo = await response.json();
  $("mall").textContent = tenantInfo.name;
  const format = new Intl.NumberFormat(undefined, { style: "currency", currency: tenantInfo.currency });
  const digits = format.resolvedOptions().maximumFractionDigits;
  money = (minor) => format.format(minor / 10 ** digits);
}

let shownPool = null;
let targetPool = null;
let animation = null;

function showPool(poolMinor) {
  const pool = $("pool");
  pool.dataset.poolMinor = String(poolMinor);
  targetPool = poolMinor;
  if (shownPool === null || poolMinor < shownPool) {
    shownPool = poolMinor;
    pool.textContent = money(poolMinor);
    return;
  }
  if (animation) return;
  const step = () => {
    const gap = targetPool - shownPool;
    shownPool = gap <= 1 ? targetPool : shownPool + Math.ceil(gap / 8);
    pool.textContent = money(shownPool);
    animation = shownPool === targetPool ? null : requestAnimationFrame(step);
  };
  animation = requestAnimationFrame(step);
}

// ---- hits and their verification ------------------------------------------

async function sha256Hex(text) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

function addHit(hit, fresh) {
  const list = $("hits");
  if (list.querySelector(`[data-cycle="${hit.cycle}"]`)) return;
  const item = document.createElement("li");
  item.dataset.cycle = String(hit.cycle);
  if (fresh) item.className = "new";
  const when = new Date(hit.at).toLocaleTimeString();
  item.append(`${money(hit.amount_minor)} — ${hit.customer} · ${when}`);
  const verify = document.createElement("a");
  verify.href = "#";
  verify.className = "verify";
  verify.textContent = "verify";
  const proof = document.createElement("span");
  proof.className = "proof";
  proof.hidden = true;
  verify.addEventListener("click", async (event) => {
    event.preventDefault();
    const computed = await sha256Hex(`${hit.trigger_minor}:${hit.salt}`);
    const ok = computed === hit.commitment;
    proof.hidden = false;
    proof.innerHTML = "";
    const verdict = document.createElement("span");
    verdict.className = ok ? "verified" : "mismatch";
    verdict.textContent = ok ? "✓ verified: " : "✗ does not match: ";
    proof.append(verdict,
      `trigger ${hit.trigger_minor} · salt ${hit.salt} · sha256("${hit.trigger_minor}:${hit.salt}") = ${computed}` +
      ` · commitment published before the round: ${hit.commitment}`);
  });
  item.append(verify, proof);
  list.prepend(item);
  while (list.children.length > 5) list.lastChild.remove();
}

// ---- the leaderboard -----------------------------------------------------

function showLeaderboard(board) {
  const list = $("leaderboard");
  list.innerHTML = "";
  for (const entry of board.entries.slice(0, 10)) {
    const item = document.createElement("li");
    item.dataset.customer = entry.customer;
    const score = document.createElement("span");
    score.className = "score";
    // Spend is money (minor units); other metrics are counts.
    score.textContent = board.metric === "spend" ? money(entry.score) : entry.score.toLocaleString();
    item.append(entry.customer, score);
    list.append(item);
  }
}

// ---- Server-Sent Events over fetch, with reconnects ------------------------

async function follow(path, onEvent) {
  let lastEventId = null;
  let backoff = 500;
  for (;;) {
    try {
      const requestHeaders = { ...headers, Accept: "text/event-stream" };
      if (lastEventId) requestHeaders["Last-Event-ID"] = lastEventId;
      const response = await fetch(path, { headers: requestHeaders, cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setStatus("live", "live");
      backoff = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = { event: "message", id: null, data: "" };
          for (const line of frame.split("\n")) {
            if (line.startsWith("event:")) event.event = line.slice(6).trim();
            else if (line.startsWith("id:")) event.id = line.slice(3).trim();
            else if (line.startsWith("data:")) event.data += line.slice(5).trim();
          }
          if (event.id) lastEventId = event.id;
          if (event.data) onEvent(event.event, JSON.parse(event.data));
        }
      }
      throw new Error("stream ended");
    } catch (error) {
      setStatus("offline", `reconnecting… (${error.message})`);
      await new Promise((resolve) => setTimeout(resolve, backoff));
      backoff = Math.min(backoff * 2, 10000);
    }
  }
}

async function start() {
  if (!tenant || !key || (!jackpotId && !leaderboardId)) {
    $("help").hidden = false;
    setStatus("offline", "not configured");
    return;
  }
  await loadTenant();
  if (jackpotId) {
    const response = await fetch(`${api}/jackpots/${encodeURIComponent(jackpotId)}`, { headers });
    if (response.ok) {
      const jackpot = await response.json();
      $("cap").textContent = money(jackpot.cap_minor);
      $("cycle").textContent = String(jackpot.cycle);
      if (jackpot.last_hit) addHit(jackpot.last_hit, false);
    }
    follow(`${api}/jackpots/${encodeURIComponent(jackpotId)}/stream`, (event, data) => {
      if (event === "pool") {
        $("cycle").textContent = String(data.cycle);
        showPool(data.pool_minor);
      } else if (event === "hit") {
        addHit(data, true);
      }
    });
  } else {
    $("jackpot-panel").hidden = true;
  }
  if (leaderboardId) {
    follow(`${api}/leaderboards/${encodeURIComponent(leaderboardId)}/stream?top=10`, (event, data) => {
      if (event === "top") showLeaderboard(data);
    });
  } else {
    $("leaderboard-panel").hidden = true;
  }
}

start();
