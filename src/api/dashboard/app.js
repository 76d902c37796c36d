// llm-meter's dashboard: reads our own JSON endpoints and draws them; no framework, no build.
// Every request goes to this page's origin, with the credentials the browser already holds for
// it (the admin token, when one is set, as the HTTP Basic password it asked for).
"use strict";

const REFRESH_MS = 10000;
const DAYS = 30;
const TOP = 8;
const COLORS = ["#1f6feb", "#2da44e", "#bf8700", "#8250df", "#cf222e", "#1b7c83", "#bc4c00", "#6e7781"];
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function usd(value) {
  const v = Number(value) || 0;
  if (v === 0) return "$0";
  if (Math.abs(v) >= 100) return "$" + v.toFixed(0);
  if (Math.abs(v) >= 1) return "$" + v.toFixed(2);
  return "$" + v.toPrecision(3).replace(/0+$/, "");
}

function count(n) {
  return String(Number(n) || 0).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

// A JSON answer, or {error} with the server's message (history without a ledger says so).
async function get(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const code = body.error && body.error.code;
    return { error: code || String(response.status), message: body.error && body.error.message };
  }
  return body;
}

function utcDay(offset) {
  const d = new Date();
  d.setUTCHours(0, 0, 0, 0);
  d.setUTCDate(d.getUTCDate() + offset);
  return d.toISOString().slice(0, 10);
}

// The filter chosen in the selector, as query pairs (`key=ID`, `user=alice`, `tag.team=search`).
function scope() {
  return $("scope").value;
}

function fillScope(stats, users, tags) {
  const select = $("scope");
  const chosen = select.value;
  const options = [["", "every key"]];
  for (const k of stats.keys || []) options.push(["key=" + encodeURIComponent(k.id), "key " + k.key]);
  for (const u of users) options.push(["user=" + encodeURIComponent(u.name), "user " + u.name]);
  for (const t of tags) {
    options.push(["tag." + t.tag + "=" + encodeURIComponent(t.value), "tag " + t.tag + "=" + t.value]);
  }
  select.replaceChildren(...options.map(([value, label]) => el("option", { value }, label)));
  select.value = options.some(([value]) => value === chosen) ? chosen : "";
}

function showTotals(stats, partial) {
  const t = stats.totals;
  $("total-cost").textContent = usd(t.cost_usd);
  $("total-cost").dataset.usd = String(t.cost_usd);
  $("total-requests").textContent = count(t.requests);
  $("total-tokens").textContent = count(t.total_tokens);
  $("total-errors").textContent = count(t.errors);
  $("unpriced").textContent = count(t.unpriced_requests);
  $("estimated").textContent = count(t.estimated_requests);
  $("partial").textContent = partial === null ? "needs the ledger" : count(partial);
  $("period").textContent = "Since " + stats.since.replace("T", " ").slice(0, 19) + " UTC";
}

function table(id, heads, rows) {
  const head = el("tr");
  heads.forEach((h, i) => head.append(el("th", i ? { class: "num" } : {}, h)));
  const body = rows.length
    ? rows.map((cells) => {
        const tr = el("tr");
        cells.forEach((c, i) => tr.append(el("td", { class: i ? "num" : "name" }, c)));
        return tr;
      })
    : [el("tr", {}, "")];
  if (!rows.length) body[0].append(el("td", { class: "empty", colspan: heads.length }, "none yet"));
  $(id).replaceChildren(head, ...body);
}

// A spend with unpriced requests in it is unknown, or a lower bound: never a plain "$0" (as in
// /stats?format=text).
function spend(cost, unpriced) {
  if (!unpriced) return usd(cost);
  return (Number(cost) || 0) === 0 ? "unknown" : usd(cost) + " + unknown";
}

function note(id, heads, text) {
  table(id, heads, []);
  $(id).querySelector("td").textContent = text;
}

function showTops(stats, users, tags, history) {
  const keys = (stats.keys || []).slice(0, TOP).map((k) => [k.key, count(k.requests), spend(k.cost_usd, k.unpriced_requests)]);
  table("top-keys", ["key", "requests", "spend"], keys);
  const models = new Map();
  for (const k of stats.keys || []) {
    for (const [name, m] of Object.entries(k.models || {})) {
      const sum = models.get(name) || { requests: 0, cost: 0, unpriced: 0 };
      sum.requests += m.requests;
      sum.cost += m.cost_usd;
      sum.unpriced += m.unpriced_requests || 0;
      models.set(name, sum);
    }
  }
  const byCost = [...models].sort((a, b) => b[1].cost - a[1].cost || b[1].requests - a[1].requests);
  table("top-models", ["model", "requests", "spend"], byCost.slice(0, TOP).map(([n, m]) => [n, count(m.requests), spend(m.cost, m.unpriced)]));
  if (!history) {
    note("top-users", ["user", "requests", "spend"], "Users and tags are kept in the ledger: start llm-meter with persistence on to see them.");
    note("top-tags", ["tag", "requests", "spend"], "Needs the ledger.");
    return;
  }
  table("top-users", ["user", "requests", "spend"], users.slice(0, TOP).map((u) => [u.name, count(u.requests), usd(u.cost_usd)]));
  table("top-tags", ["tag", "requests", "spend"], tags.slice(0, TOP).map((t) => [t.tag + "=" + t.value, count(t.requests), usd(t.cost_usd)]));
}

function showBudgets(admin) {
  const box = $("budgets");
  const scopes = [["all keys", admin.global || []]];
  for (const k of admin.keys || []) scopes.push(["key " + k.name, k.budget || []]);
  const lines = [];
  for (const [name, budget] of scopes) {
    for (const line of budget) {
      const share = line.limit_usd > 0 ? line.spent_usd / line.limit_usd : 1;
      const level = share >= 1 ? "over" : share >= 0.8 ? "warn" : "";
      const head = el("div", { class: "budget-head" });
      head.append(el("span", {}, name + ", " + line.period), el("span", {}, usd(line.spent_usd) + " of " + usd(line.limit_usd)));
      const bar = el("svg:svg", { viewBox: "0 0 100 10", preserveAspectRatio: "none", role: "img", "aria-label": Math.round(share * 100) + "%" });
      bar.append(el("svg:rect", { x: 0, y: 0, height: 10, width: Math.min(100, share * 100).toFixed(2) }));
      const meter = el("div", { class: "meter " + level });
      meter.append(bar);
      const item = el("div", { class: "budget" });
      item.append(head, meter);
      lines.push(item);
    }
  }
  box.replaceChildren(...(lines.length ? lines : [el("p", { class: "empty" }, "No budget is set.")]));
}

function showAlerts(alerts) {
  const items = (alerts.alerts || []).slice(0, 10).map((a) => {
    const li = el("li");
    li.append(el("time", { datetime: a.at }, a.at.replace("T", " ").slice(0, 19)), document.createTextNode(a.message));
    return li;
  });
  $("alerts").replaceChildren(...(items.length ? items : [el("li", { class: "empty" }, "No alert since start.")]));
}

// Spend per day (UTC) stacked by model: the costliest models each in a color, the rest as one.
function drawChart(usage) {
  const svg = $("chart");
  const days = [];
  for (let i = 1 - DAYS; i <= 0; i++) days.push(utcDay(i));
  const perModel = new Map();
  for (const row of usage.rows || []) perModel.set(row.model, (perModel.get(row.model) || 0) + row.cost_usd);
  const ranked = [...perModel].filter(([, cost]) => cost > 0).sort((a, b) => b[1] - a[1]).map(([m]) => m);
  const shown = ranked.slice(0, COLORS.length - 1);
  const color = (model) => COLORS[shown.includes(model) ? shown.indexOf(model) : COLORS.length - 1];
  const stacks = new Map(days.map((d) => [d, []]));
  for (const row of usage.rows || []) {
    const stack = stacks.get(row.day);
    if (stack && row.cost_usd > 0) stack.push(row);
  }
  const totals = days.map((d) => stacks.get(d).reduce((s, r) => s + r.cost_usd, 0));
  const max = Math.max(...totals) || 1;
  // Drawn at the size it is shown, so that its text is as large as the page's.
  const w = Math.max(280, Math.round(svg.getBoundingClientRect().width) || 640);
  const [h, left, bottom, top] = [w < 500 ? 180 : 240, 64, 22, 10];
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const step = (w - left - 4) / DAYS;
  const y = (v) => h - bottom - (v / max) * (h - bottom - top);
  const nodes = [];
  for (const f of [0, 0.5, 1]) {
    nodes.push(el("svg:line", { class: "grid", x1: left, x2: w, y1: y(max * f), y2: y(max * f) }));
    nodes.push(el("svg:text", { x: left - 6, y: y(max * f) + 4, "text-anchor": "end" }, usd(max * f)));
  }
  days.forEach((day, i) => {
    let base = 0;
    const x = left + i * step + 1;
    for (const row of stacks.get(day).sort((a, b) => ranked.indexOf(a.model) - ranked.indexOf(b.model))) {
      const rect = el("svg:rect", { x: x.toFixed(1), width: (step - 2).toFixed(1), y: y(base + row.cost_usd).toFixed(1), height: Math.max(0.5, y(base) - y(base + row.cost_usd)).toFixed(1), fill: color(row.model) });
      rect.append(el("svg:title", {}, day + " " + row.model + ": " + usd(row.cost_usd) + ", " + count(row.requests) + " requests"));
      nodes.push(rect);
      base += row.cost_usd;
    }
    if ((DAYS - 1 - i) % (w < 500 ? 10 : 5) === 0) {
      const last = i === DAYS - 1;
      const at = last ? x + step - 2 : x + step / 2;
      nodes.push(el("svg:text", { x: at.toFixed(1), y: h - 6, "text-anchor": last ? "end" : "middle" }, day.slice(5)));
    }
  });
  svg.replaceChildren(...nodes);
  const legend = ranked.slice(0, COLORS.length).map((model, i) => {
    const swatch = el("svg:svg", { class: "swatch", viewBox: "0 0 10 10" });
    swatch.append(el("svg:rect", { width: 10, height: 10, rx: 2, fill: color(model) }));
    const li = el("li");
    li.append(swatch, document.createTextNode(i === COLORS.length - 1 && ranked.length > COLORS.length ? "other models" : model));
    return li;
  });
  $("legend").replaceChildren(...legend);
}

function showHistoryNote(text) {
  $("chart-note").hidden = !text;
  $("chart-note").textContent = text || "";
}

// Users and tags of the current period; the tag names are those named keys carry by default
// and those in the ledger's `tag` grouping.
async function attribution(since) {
  const range = "&since=" + encodeURIComponent(since);
  const users = await get("/usage?group_by=user" + range);
  if (users.error) return null;
  const tags = await get("/usage?group_by=tag" + range);
  const named = (rows) => rows.filter((r) => r.user).map((r) => ({ ...r, name: r.user }));
  const tagRows = tags.error ? [] : (tags.rows || []).map((r) => ({ ...r, tag: r.tag.name, value: r.tag.value }));
  const byCost = (a, b) => b.cost_usd - a.cost_usd || b.requests - a.requests;
  return { users: named(users.rows || []).sort(byCost), tags: tagRows.sort(byCost), partial: users.totals.partial_requests };
}

async function refresh() {
  try {
    const [stats, admin, alerts] = await Promise.all([get("/stats"), get("/admin/keys"), get("/alerts")]);
    if (stats.error) throw new Error(stats.message || stats.error);
    const extra = stats.ledger === null ? null : await attribution(stats.since);
    showTotals(stats, extra ? extra.partial : null);
    showTops(stats, extra ? extra.users : [], extra ? extra.tags : [], extra !== null);
    fillScope(stats, extra ? extra.users : [], extra ? extra.tags : []);
    if (!admin.error) showBudgets(admin);
    if (!alerts.error) showAlerts(alerts);
    if (extra === null) {
      drawChart({ rows: [] });
      showHistoryNote("History needs the ledger: llm-meter runs without one (--no-persist), so only the totals since start are shown.");
    } else {
      const filter = scope() ? "&" + scope() : "";
      const usage = await get("/usage?group_by=day,model&since=" + utcDay(1 - DAYS) + filter);
      drawChart(usage.error ? { rows: [] } : usage);
      showHistoryNote(usage.error ? usage.message : "");
    }
    $("status").textContent = "Updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
  } catch (err) {
    $("status").textContent = "Could not refresh: " + err.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("scope").addEventListener("change", refresh);
  refresh();
  setInterval(refresh, REFRESH_MS);
});
