// The page: a user's timeline (memory, recent window, retrieved element), their recommendations, and a form
// that posts an interaction and shows the new state. Plain fetch() against the same app's API.
"use strict";
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}

function box(ev, retrieved) {
  const d = document.createElement("div");
  d.className = "ev " + ev.where + (retrieved ? " retrieved" : "");
  d.title = ev.where + (retrieved ? ", retrieved" : "");
  d.textContent = ev.title;
  const s = document.createElement("small");
  s.textContent = new Date(ev.time * 1000).toISOString().slice(0, 10) + " · " + ev.where;
  d.appendChild(s);
  return d;
}

async function show() {
  const user = $("user").value.trim();
  if (!user) return;
  $("error").textContent = "";
  try {
    const u = await api(`/users/${encodeURIComponent(user)}`);
    const rec = await api(`/users/${encodeURIComponent(user)}/recommendations?k=10&method=${$("method").value}`);
    const hit = new Set(rec.retrieved.map((r) => r.item_id + ":" + r.time));
    $("timeline").replaceChildren(...u.history.map((ev) => box(ev, hit.has(ev.item_id + ":" + ev.time))));
    $("memsize").textContent = `${u.interactions} interactions; memory: ${u.memory.done} elements, ${u.memory.pending} pending`;
    $("label").textContent = "(" + rec.label + (rec.cached ? ", cached" : "") + ")";
    $("recs").replaceChildren(...rec.items.map((it) => {
      const tr = document.createElement("tr");
      const kind = it.score_kind.startsWith("beam") ? "beam" : it.score_kind.startsWith("minus") ? "grounding" : "";
      for (const v of [it.rank, it.title, it.score === null ? "" : it.score.toFixed(3), kind]) {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      }
      return tr;
    }));
    const why = rec.retrieved.map((r) => `retrieved: ${r.title} (score ${r.score === null ? "-" : r.score.toFixed(3)}, ` +
      `rank ${r.rank === null ? "-" : r.rank} of ${r.memory_size})`);
    why.push("timings (ms): " + Object.entries(rec.timings_ms).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(", "));
    $("why").textContent = why.join("\n");
  } catch (e) { $("error").textContent = e.message; }
}

async function add(event) {
  event.preventDefault();
  const user = $("user").value.trim();
  const t = parseInt($("time").value, 10) || Math.floor(Date.now() / 1000);
  const body = { title: $("title").value, time: t, event_id: "page-" + Date.now() + "-" + Math.random().toString(36).slice(2, 8) };
  $("error").textContent = "";
  try {
    const r = await api(`/users/${encodeURIComponent(user)}/interactions?wait=true`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    $("status").textContent = `added ${r.interaction.title}; memory ${r.memory.status}`;
    await show();
  } catch (e) { $("error").textContent = e.message; }
}

async function titles() {
  const q = $("title").value;
  const r = await api(`/items?limit=20&query=${encodeURIComponent(q)}`);
  $("titles").replaceChildren(...r.items.map((i) => { const o = document.createElement("option"); o.value = i.title; return o; }));
}

async function users() {
  const r = await api("/users?limit=200");
  $("users").replaceChildren(...r.users.map((u) => { const o = document.createElement("option"); o.value = u.user_id; return o; }));
  const wanted = new URLSearchParams(location.search).get("user");
  if (wanted) { $("user").value = wanted; await show(); }
}

$("show").addEventListener("click", show);
$("method").addEventListener("change", show);
$("add").addEventListener("submit", add);
$("title").addEventListener("input", titles);
users();
