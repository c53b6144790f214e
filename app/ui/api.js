// Every call the dashboard makes to the REST API goes through this module.
//
// The key is kept in sessionStorage (gone when the tab closes; never in a URL or a cookie) and
// sent as a bearer header. Failures come back as ApiError, never as console noise: callers
// decide what to show. Shapes read here tolerate the light list items of later API versions
// (a summary with `verdict`, or a full item with an embedded `report`).

const KEY_SLOT = "findlady.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_SLOT);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_SLOT, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_SLOT);
}

async function request(path, { method = "GET", auth = true } = {}) {
  const headers = {};
  if (auth) {
    const key = getKey();
    if (!key) throw new ApiError(401, "unauthenticated", "no API key");
    headers.Authorization = `Bearer ${key}`;
  }
  let response;
  try {
    response = await fetch(path, { method, headers, cache: "no-store", credentials: "omit" });
  } catch (e) {
    throw new ApiError(0, "network", "the service did not answer");
  }
  if (!response.ok) {
    let detail = null;
    try {
      detail = (await response.json()).detail;
    } catch (e) {
      detail = null;
    }
    throw new ApiError(response.status, detail?.code ?? "error", detail?.message ?? response.statusText);
  }
  return response;
}

async function json(path, options) {
  return (await request(path, options)).json();
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== undefined && v !== null) q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

// A list endpoint: `{items}`, followed through `next_cursor` pages when the API paginates.
async function list(path, params, maxPages = 20) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < maxPages; page++) {
    const body = await json(path + query({ ...params, ...(cursor ? { cursor } : {}) }));
    items.push(...(body.items || []));
    cursor = body.next_cursor ?? null;
    if (!cursor) break;
  }
  return items;
}

export const me = () => json("/v1/accounts/me");
export const references = (params) => list("/v1/references", params);
export const reference = (id) => json(`/v1/references/${encodeURIComponent(id)}`);
export const verifications = (params) => list("/v1/verifications", params);
export const verification = (id) => json(`/v1/verifications/${encodeURIComponent(id)}`);
export const visuals = (id, group) =>
  json(`/v1/verifications/${encodeURIComponent(id)}/visuals` + query({ group }));

// What a list item or a job says about its outcome, in either shape.
export const verdictOf = (item) => item?.verdict ?? item?.report?.verdict ?? null;

// The routes this server has, from its OpenAPI document (public): optional features are shown
// only when they exist, without probing them (a probe that 404s would be a console error).
let routes = null;
export async function hasRoute(pattern) {
  if (routes === null) {
    try {
      routes = new Set(Object.keys((await json("/openapi.json", { auth: false })).paths || {}));
    } catch (e) {
      routes = new Set();
    }
  }
  return [...routes].some((path) => pattern.test(path));
}

export const SIGNED_REPORT_ROUTE = /^\/v1\/verifications\/\{[^}]+\}\/report$/;
export const RESYNCED_ROUTE = /^\/v1\/verifications\/\{[^}]+\}\/resynced$/;
export const signedReportPath = (id) => `/v1/verifications/${encodeURIComponent(id)}/report`;
export const resyncedPath = (id) => `/v1/verifications/${encodeURIComponent(id)}/resynced`;

// Fetch with the key and hand the body to the browser as a file (a plain link cannot carry
// the bearer header).
export async function download(path, filename) {
  const blob = await (await request(path)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
