// The dashboard: sign in with an API key, lists of references and verifications, a reference's
// versions and jobs, a job's verdict with its pictures. Client-side routes read
// location.pathname; lists poll (setTimeout) while jobs are queued or running.

import * as api from "./api.js";
import { bitStrips, heatmap, histogram, integrityBars } from "./draw.js";

const POLL_MS = 1500;
const LABELS = {
  match: "the suspect is the reference (re-synchronized), unmodified",
  match_modified: "the suspect is the reference, modified (or its watermark removed)",
  no_match: "the suspect is not the reference",
  inconclusive: "the watermark is present but the weights do not match: look closer",
};

const main = document.getElementById("main");
let account = null;
let ownRefs = null; // ids of the owner's references (null for auditors)
let timer = null;
let generation = 0; // bumped on every navigation: a stale page's poll stops itself

// ---------------------------------------------------------------------------------------------
// building blocks

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

const link = (href, text, attrs = {}) => h("a", { href, "data-nav": true, ...attrs, text });
const short = (id) => (id ? id.slice(0, 8) : "");
const when = (t) => (t ? new Date(t).toLocaleString() : "");

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function problem(e) {
  return h("p", { class: "error", "data-testid": "error", text: e instanceof api.ApiError ? e.message : String(e) });
}

function verdictBadge(verdict, testid) {
  if (!verdict) return h("span", { class: "muted", text: "-" });
  return h("code", { class: `verdict ${verdict}`, "data-testid": testid, text: verdict });
}

function poll(fn, gen) {
  clearTimeout(timer);
  timer = setTimeout(() => {
    if (gen === generation) fn();
  }, POLL_MS);
}

const running = (jobs) => jobs.some((j) => j.status === "queued" || j.status === "running");

// ---------------------------------------------------------------------------------------------
// pages

function loginPage(message) {
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off",
    placeholder: "fl_...", required: true, "data-testid": "api-key" });
  const form = h("form", { id: "login", "data-testid": "login", onsubmit: async (ev) => {
    ev.preventDefault();
    api.setKey(input.value.trim());
    const ok = await signIn();
    if (ok) route();
    else loginPage("that key was not accepted");
  } },
  h("label", { for: "api-key", text: "API key" }), input, h("button", { type: "submit", text: "Sign in" }));
  show(h("section", { class: "card" }, h("h1", { text: "Sign in" }),
    h("p", { class: "muted", text: "The key stays in this tab (sessionStorage) and is sent only to this server." }),
    form, message ? h("p", { class: "error", "data-testid": "login-error", text: message }) : null));
  input.focus();
}

async function signIn() {
  try {
    account = await api.me();
  } catch (e) {
    api.clearKey();
    account = null;
    return false;
  }
  ownRefs = null;
  document.getElementById("who").textContent = `${account.name} (${account.role})`;
  document.getElementById("sign-out").hidden = false;
  return true;
}

function jobsTable(jobs) {
  if (!jobs.length) return h("p", { class: "muted", "data-testid": "no-jobs", text: "No verifications yet." });
  return h("table", { "data-testid": "jobs" },
    h("thead", {}, h("tr", {}, ["job", "reference", "status", "verdict", "submitted", "finished"].map((t) => h("th", { text: t })))),
    h("tbody", {}, jobs.map((j) => h("tr", { "data-testid": "job-row", "data-id": j.id },
      h("td", {}, link(`/ui/verifications/${j.id}`, short(j.id))),
      h("td", {}, ownRefs && ownRefs.has(j.reference_id) ? link(`/ui/references/${j.reference_id}`, short(j.reference_id))
        : h("span", { text: short(j.reference_id) })),
      h("td", { class: `status ${j.status}`, "data-testid": "job-status", text: j.status }),
      h("td", {}, verdictBadge(api.verdictOf(j), "job-verdict")),
      h("td", { text: when(j.created_at) }),
      h("td", { text: when(j.finished_at) })))));
}

function refsTable(refs) {
  if (!refs.length) return h("p", { class: "muted", "data-testid": "no-refs", text: "No references registered." });
  return h("table", { "data-testid": "refs" },
    h("thead", {}, h("tr", {}, ["name", "version", "groups", "watermark key", "registered"].map((t) => h("th", { text: t })))),
    h("tbody", {}, refs.map((r) => h("tr", { "data-testid": "ref-row", "data-id": r.id },
      h("td", {}, link(`/ui/references/${r.id}`, r.name)),
      h("td", { text: `v${r.version}` }),
      h("td", { text: String(r.groups) }),
      h("td", { text: r.has_key ? r.key_layer : "none" }),
      h("td", { text: when(r.created_at) })))));
}

async function loadOwnRefs() {
  if (account.role !== "owner") return [];
  const refs = await api.references();
  ownRefs = new Set(refs.map((r) => r.id));
  return refs;
}

async function homePage(gen) {
  try {
    const refs = await loadOwnRefs();
    const jobs = await api.verifications();
    if (gen !== generation) return;
    show(
      account.role === "owner" ? h("section", {}, h("h2", { text: "References" }), refsTable(refs)) : null,
      h("section", {}, h("h2", { text: "Verifications" }), jobsTable(jobs)),
    );
    if (running(jobs)) poll(() => homePage(gen), gen);
  } catch (e) {
    if (gen === generation) show(problem(e));
  }
}

async function referencePage(id, gen) {
  if (account.role !== "owner") {
    show(h("p", { class: "muted", "data-testid": "error", text: "References are shown to their owners only." }));
    return;
  }
  try {
    await loadOwnRefs();
    const ref = await api.reference(id);
    const versions = await api.references({ name: ref.name });
    const jobs = await api.verifications({ reference_id: id });
    if (gen !== generation) return;
    show(
      h("section", { class: "card" }, h("h1", { "data-testid": "ref-name", text: `${ref.name} v${ref.version}` }),
        h("dl", {}, ...[["id", ref.id], ["sha256", ref.sha256], ["parameters", String(ref.parameters)],
          ["groups", String(ref.groups)], ["spec", ref.spec_source], ["watermark key", ref.has_key ? ref.key_layer : "none"]]
          .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]))),
      h("section", {}, h("h2", { text: "Versions" }), refsTable(versions)),
      h("section", {}, h("h2", { text: "Verifications against this version" }), jobsTable(jobs)),
    );
    if (running(jobs)) poll(() => referencePage(id, gen), gen);
  } catch (e) {
    if (gen === generation) show(h("h1", { text: "Reference" }), problem(e));
  }
}

async function jobPage(id, gen) {
  let job;
  try {
    job = await api.verification(id);
  } catch (e) {
    if (gen === generation) show(h("h1", { text: "Verification" }), problem(e));
    return;
  }
  if (gen !== generation) return;
  const head = h("section", { class: "card" },
    h("h1", { text: `Verification ${short(job.id)}` }),
    h("p", {}, "status ", h("span", { class: `status ${job.status}`, "data-testid": "status", text: job.status }),
      ` · attempts ${job.attempts} · submitted ${when(job.created_at)}`));
  if (job.status === "queued" || job.status === "running") {
    show(head);
    poll(() => jobPage(id, gen), gen);
    return;
  }
  if (job.status === "failed") {
    show(head, h("p", { class: "error", "data-testid": "job-error", text: `${job.error?.code}: ${job.error?.message}` }));
    return;
  }
  const report = job.report || {};
  const verdict = api.verdictOf(job);
  head.append(
    h("p", { class: "verdict-line" }, verdictBadge(verdict, "verdict"),
      h("span", { class: "verdict-label", "data-testid": "verdict-label", text: LABELS[verdict] || "" })),
    h("ul", { "data-testid": "reasons" }, (report.reasons || []).map((r) => h("li", { text: r }))),
  );
  const links = h("p", { class: "links", "data-testid": "links" });
  head.append(links);
  show(head, h("section", { id: "pictures", "data-testid": "pictures" }, h("p", { class: "muted", text: "loading pictures ..." })));
  addLinks(job, links);
  await pictures(job, null, gen);
}

async function addLinks(job, node) {
  const items = [];
  if (await api.hasRoute(api.SIGNED_REPORT_ROUTE)) {
    items.push(["signed report", api.signedReportPath(job.id), `findlady-report-${job.id}.json`, "signed-report"]);
  }
  if (account.role === "owner" && ownRefs === null) await loadOwnRefs().catch(() => null);
  const owner = ownRefs !== null && ownRefs.has(job.reference_id); // the re-synchronized weights are the owner's
  if (owner && (await api.hasRoute(api.RESYNCED_ROUTE))) {
    items.push(["re-synchronized model", api.resyncedPath(job.id), `resynced-${job.id}.safetensors`, "resynced"]);
  }
  for (const [text, path, file, testid] of items) {
    node.append(h("button", { type: "button", class: "link", "data-testid": testid, text: `download the ${text}`,
      onclick: () => api.download(path, file).catch((e) => node.append(problem(e))) }), " ");
  }
}

function figure(title, testid, el, caption) {
  el.setAttribute("data-testid", testid);
  return h("figure", {}, h("figcaption", { text: title }), el, caption ? h("p", { class: "muted", text: caption }) : null);
}

const svg = () => document.createElementNS("http://www.w3.org/2000/svg", "svg");

async function pictures(job, group, gen) {
  const box = document.getElementById("pictures");
  let v;
  try {
    v = await api.visuals(job.id, group);
  } catch (e) {
    if (gen === generation && box) box.replaceChildren(problem(e));
    return;
  }
  if (gen !== generation || !box) return;
  const nodes = [];
  if (v.matrix) {
    const select = h("select", { "data-testid": "group-select", onchange: (ev) => pictures(job, ev.target.value, gen) },
      v.groups.filter((g) => g.matrix).map((g) => h("option", { value: g.name, selected: g.name === v.group,
        text: `${g.name} (${g.size} neurons, ${g.moved} moved)` })));
    const before = h("canvas", { class: "heatmap" });
    const after = h("canvas", { class: "heatmap" });
    heatmap(before, v.matrix.before);
    heatmap(after, v.matrix.after);
    const shown = v.matrix.indices.length < v.matrix.size ? ` (${v.matrix.indices.length} of ${v.matrix.size} neurons, evenly spaced)` : "";
    nodes.push(h("section", {}, h("h2", { text: "Similarity, reference neurons x suspect neurons" }),
      h("label", { text: "group " }, select),
      h("div", { class: "pair" },
        figure(`before re-synchronization${shown}`, "sim-before", before, "the suspect's neurons in the order it came in"),
        figure(`after re-synchronization${shown}`, "sim-after", after, "columns in the recovered order: a copy shows a bright diagonal"))));
  }
  const chosen = v.groups.find((g) => g.name === v.group);
  const hist = svg();
  histogram(hist, v.margins.edges, v.margins.counts, { highlight: chosen?.margin_counts });
  const bars = svg();
  integrityBars(bars, v.integrity.units);
  nodes.push(h("section", { class: "pair" },
    figure(`margins, ${v.margins.neurons} neurons (darker: group ${v.group ?? "-"})`, "margins", hist),
    figure(`integrity: ${v.integrity.status}`, "integrity", bars, "flagged neurons per group or layer")));
  if (v.watermark) {
    const strips = svg();
    strips.setAttribute("class", "wide");
    bitStrips(strips, v.watermark);
    nodes.push(h("section", {}, figure(`watermark bits (${v.watermark.layer}): key, read before and after re-synchronization`,
      "bits", strips, "red: a bit that differs from the key")));
  } else {
    nodes.push(h("p", { class: "muted", "data-testid": "no-key", text: "No watermark key registered: no bits to read." }));
  }
  box.replaceChildren(...nodes);
}

// ---------------------------------------------------------------------------------------------
// routing

async function route() {
  generation += 1;
  clearTimeout(timer);
  const gen = generation;
  if (!api.getKey() || !account) {
    if (!api.getKey() || !(await signIn())) return loginPage(null);
  }
  const path = location.pathname;
  let m;
  if ((m = path.match(/^\/ui\/verifications\/([^/]+)$/))) return jobPage(decodeURIComponent(m[1]), gen);
  if ((m = path.match(/^\/ui\/references\/([^/]+)$/))) return referencePage(decodeURIComponent(m[1]), gen);
  return homePage(gen);
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-nav]");
  if (!a || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.button !== 0) return;
  ev.preventDefault();
  history.pushState(null, "", a.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);
document.getElementById("sign-out").addEventListener("click", () => {
  api.clearKey();
  account = null;
  ownRefs = null;
  document.getElementById("who").textContent = "";
  document.getElementById("sign-out").hidden = true;
  route();
});
route();
