// The crushd console: a thin page over crushd's own HTTP API.
//
// State comes from the API (workspaces, sessions, messages, runs,
// permissions) and is kept current by one EventSource per selected
// workspace.  The browser resumes that stream itself with Last-Event-ID;
// when it gives up (the daemon restarted, or a sign-in was lost) the page
// polls /v1/health, reloads what it shows and opens the stream again with
// ?since= the last event it saw.  A `reset` event means events were missed:
// everything shown is fetched again.

const $ = (id) => document.getElementById(id);

// Every event type the server publishes: crushd.events.EventType, which
// the server writes into the page it serves.
const EVENT_TYPES = JSON.parse($("event-types").textContent);
const ACTIVE = new Set(["queued", "running"]);
// A run's statuses only move forward; an older copy never replaces a newer one.
const RUN_RANK = { queued: 0, running: 1, completed: 2, cancelled: 2, failed: 2, interrupted: 2 };
const LOG_LIMIT = 2000;
const QUIET_FINISH = new Set(["end_turn", "tool_use"]);

const state = {
  workspaces: [],
  workspaceId: null,
  sessions: [],
  sessionId: null,
  messages: [],      // of the selected session, oldest first
  runs: [],          // of the selected session, newest first
  permissions: [],   // pending, whole workspace
  models: [],
  retries: new Map(),  // run id -> last run.retrying payload
  streamed: new Map(), // message id -> {text, reasoning} streamed on this connection
  log: [],             // the workspace's recent events, replayed over a fetch that was in flight
  lastSeq: null,
  source: null,
  down: false,
  signedIn: true,
  diffs: new Map(),    // run id -> {open, text, error}: the runs whose diff is shown
  reverting: null,     // {run, files} while a revert waits for "Revert anyway"
};

class ApiError extends Error {
  constructor(status, code, message, files = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.files = files; // workspace_changed: the files that changed
  }
}

// ---------------------------------------------------------------- HTTP

// JSON in and out; with as = "text" a successful answer is returned as text.
async function api(method, path, body, as = "json") {
  const init = { method, credentials: "same-origin", cache: "no-store", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    lostConnection();
    throw new ApiError(0, "unreachable", "crushd is not reachable");
  }
  if (response.status === 401 && path !== "/v1/login") {
    showSignIn();
    throw new ApiError(401, "unauthorized", "sign in first");
  }
  if (response.status === 204 || response.status === 304) return null;
  if (response.ok && as === "text") return response.text();
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || "error", error.message || response.statusText, error.files || []);
  }
  return data;
}

const ws = (path = "") => `/v1/workspaces/${encodeURIComponent(state.workspaceId)}${path}`;

// ---------------------------------------------------------------- connection

function setConnection(text, kind) {
  const el = $("connection");
  el.textContent = text;
  el.dataset.state = kind;
}

let retryTimer = null;

function lostConnection() {
  closeStream();
  if (!state.down) {
    state.down = true;
    setConnection("Disconnected — reconnecting…", "down");
  }
  if (retryTimer === null) scheduleReconnect(1000);
}

function scheduleReconnect(delay) {
  retryTimer = setTimeout(async () => {
    retryTimer = null;
    try {
      const response = await fetch("/v1/health", { cache: "no-store" });
      if (!response.ok) throw new Error(String(response.status));
    } catch (err) {
      scheduleReconnect(Math.min(delay * 2, 5000));
      return;
    }
    state.down = false;
    try {
      await loadAll();
    } catch (err) {
      if (err.status === 401) return;
      lostConnection();
    }
  }, delay);
}

// ---------------------------------------------------------------- sign in

function showSignIn() {
  closeStream();
  state.signedIn = false;
  $("app-view").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-view").hidden = false;
  setConnection("Signed out", "down");
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const error = $("sign-in-error");
  error.textContent = "";
  try {
    await api("POST", "/v1/login", { token: $("token").value });
  } catch (err) {
    error.textContent = err.status === 401 ? "Wrong token." : err.message;
    $("token").select();
    return;
  }
  $("token").value = "";
  await loadAll();
}

async function signOut() {
  await api("POST", "/v1/logout").catch(() => null);
  showSignIn();
}

// ---------------------------------------------------------------- loading

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  return { workspace: params.get("w"), session: params.get("s") };
}

function writeHash() {
  const params = new URLSearchParams();
  if (state.workspaceId) params.set("w", state.workspaceId);
  if (state.sessionId) params.set("s", state.sessionId);
  const hash = params.toString();
  history.replaceState(null, "", hash ? `#${hash}` : location.pathname);
}

async function loadAll() {
  const workspaces = await api("GET", "/v1/workspaces");
  // Signed in by cookie, or no token at all? Ask once without the cookie.
  const bare = await fetch("/v1/version", { credentials: "omit", cache: "no-store" }).catch(() => null);
  $("sign-out").hidden = !bare || bare.status !== 401;
  state.workspaces = workspaces;
  state.models = await api("GET", "/v1/models").catch(() => []);
  $("sign-in-view").hidden = true;
  $("app-view").hidden = false;
  state.signedIn = true;
  renderModels();
  const wanted = readHash();
  const keep = workspaces.find((w) => w.id === (state.workspaceId || wanted.workspace));
  const chosen = keep || workspaces[0] || null;
  if (!chosen) {
    state.workspaceId = null;
    renderAll();
    setConnection("Connected", "up");
    return;
  }
  const sessionId = chosen.id === state.workspaceId ? state.sessionId : wanted.session;
  await selectWorkspace(chosen.id, sessionId);
}

async function selectWorkspace(id, sessionId = null) {
  const changed = id !== state.workspaceId;
  closeStream();
  if (changed) {
    state.lastSeq = null;
    state.log = [];
    state.streamed.clear();
    state.retries.clear();
  }
  state.workspaceId = id;
  // Subscribe first, then fetch: what happens during the fetch is not lost.
  openStream();
  await reloadWorkspace(sessionId);
}

// A fetch answers with the state of some moment while events keep coming:
// one that arrived while the fetch was in flight may be newer than what it
// returned (a permission asked for meanwhile), so those are applied again.
function eventsSince(mark) {
  return state.log.filter((e) => mark === null || e.seq > mark);
}

function replaySessions(mark) {
  for (const e of eventsSince(mark)) {
    const p = e.payload || {};
    if (e.type === "permission.requested") upsert(state.permissions, p, false);
    else if (e.type === "permission.resolved") state.permissions = state.permissions.filter((x) => x.id !== p.id);
    else if (e.type === "session.created" || e.type === "session.updated") upsert(state.sessions, p, true);
    else if (e.type === "session.deleted") state.sessions = state.sessions.filter((x) => x.id !== p.id);
  }
}

function replayConversation(mark, sid) {
  for (const e of eventsSince(mark)) {
    const p = e.payload || {};
    if (e.session_id !== sid) continue;
    if (e.type === "message.created" || e.type === "message.updated") {
      const old = state.messages.find((m) => m.id === p.id);
      if (!old || (p.updated_at || "") > (old.updated_at || "")) upsert(state.messages, mergeStreamed(p), false);
    } else if (e.type === "run.queued" || e.type === "run.started" || e.type === "run.completed") {
      const old = state.runs.find((r) => r.id === p.id);
      if (!old || RUN_RANK[p.status] > RUN_RANK[old.status]) upsert(state.runs, p, true);
    }
  }
}

async function reloadWorkspace(sessionId = state.sessionId) {
  if (!state.workspaceId) return;
  const mark = state.lastSeq;
  const [sessions, permissions] = await Promise.all([
    api("GET", ws("/sessions")),
    api("GET", ws("/permissions")),
  ]);
  state.sessions = sessions;
  state.permissions = permissions;
  replaySessions(mark);
  const known = state.sessions.some((s) => s.id === sessionId);
  state.sessionId = known ? sessionId : null;
  await reloadSession();
}

async function reloadSession() {
  const sid = state.sessionId;
  if (!sid) {
    state.messages = [];
    state.runs = [];
    renderAll();
    return;
  }
  const mark = state.lastSeq;
  const [messages, runs] = await Promise.all([
    api("GET", ws(`/sessions/${encodeURIComponent(sid)}/messages`)),
    api("GET", ws(`/runs?session_id=${encodeURIComponent(sid)}&limit=50`)),
  ]);
  if (sid !== state.sessionId) return;
  state.messages = messages.map(mergeStreamed);
  state.runs = runs;
  replayConversation(mark, sid);
  renderAll();
}

// A message still streaming may be behind in the database (its writes are
// coalesced) or already hold some of the deltas this page received: join
// the stored text and the streamed text on their overlap.
function mergeStreamed(message) {
  const streamed = state.streamed.get(message.id);
  if (!streamed || message.parts.some((p) => p.type === "finish")) return message;
  const parts = message.parts.map((p) => ({ ...p }));
  for (const kind of ["text", "reasoning"]) {
    const live = streamed[kind];
    if (!live) continue;
    let part = [...parts].reverse().find((p) => p.type === kind);
    if (!part) {
      part = { type: kind, text: "" };
      parts.push(part);
    }
    part.text = joinOverlap(part.text, live);
  }
  return { ...message, parts };
}

function joinOverlap(stored, live) {
  for (let k = Math.min(stored.length, live.length); k > 0; k--) {
    if (stored.endsWith(live.slice(0, k))) return stored + live.slice(k);
  }
  return stored + live;
}

// ---------------------------------------------------------------- events

function closeStream() {
  if (state.source) {
    state.source.close();
    state.source = null;
  }
}

function openStream() {
  if (!state.workspaceId) return;
  closeStream();
  let url = ws("/events");
  if (state.lastSeq !== null) url += `?since=${state.lastSeq}`;
  const source = new EventSource(url);
  state.source = source;
  source.onopen = () => {
    if (state.source === source) setConnection("Connected", "up");
  };
  source.onerror = () => {
    if (state.source !== source) return;
    if (source.readyState === EventSource.CLOSED) {
      lostConnection();
    } else {
      setConnection("Reconnecting…", "down");
    }
  };
  for (const type of EVENT_TYPES) {
    source.addEventListener(type, (event) => {
      if (state.source !== source) return;
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      state.lastSeq = data.seq;
      if (data.type !== "message.delta") {
        state.log.push(data);
        if (state.log.length > LOG_LIMIT) state.log.splice(0, state.log.length - LOG_LIMIT);
      }
      handleEvent(data);
    });
  }
}

function handleEvent(event) {
  const p = event.payload || {};
  const inSession = event.session_id && event.session_id === state.sessionId;
  switch (event.type) {
    case "reset":
      state.streamed.clear();
      reloadWorkspace().catch(() => null);
      return;
    case "workspace.closing":
      setConnection("Workspace closing…", "down");
      return;
    case "session.created":
    case "session.updated":
      upsert(state.sessions, p, true);
      renderSessions();
      if (p.id === state.sessionId) renderTitle();
      return;
    case "session.deleted":
      state.sessions = state.sessions.filter((s) => s.id !== p.id);
      if (p.id === state.sessionId) selectSession(null);
      renderSessions();
      return;
    case "message.created":
    case "message.updated":
      if (p.parts && p.parts.some((part) => part.type === "finish")) state.streamed.delete(p.id);
      if (inSession) {
        upsert(state.messages, mergeStreamed(p), false);
        renderConversation();
      }
      return;
    case "message.delta":
      onDelta(p, inSession);
      return;
    case "message.reset":
      state.streamed.delete(p.message_id);
      if (inSession) {
        const message = state.messages.find((m) => m.id === p.message_id);
        if (message) {
          message.parts = message.parts.filter((part) => part.type !== "text" && part.type !== "reasoning");
          renderConversation();
        }
      }
      return;
    case "run.queued":
    case "run.started":
    case "run.completed":
      onRun(event.type, p, inSession);
      return;
    case "run.retrying":
      state.retries.set(p.run_id, p);
      if (inSession) renderRuns();
      return;
    case "permission.requested":
      upsert(state.permissions, p, false);
      renderPermissions();
      renderSessions();
      return;
    case "permission.resolved":
      state.permissions = state.permissions.filter((x) => x.id !== p.id);
      renderPermissions();
      renderSessions();
      return;
    case "session.compacted":
      if (inSession) reloadSession().catch(() => null);
      return;
    case "run.diff":
      if (inSession && state.diffs.get(p.run_id)?.open) loadDiff(p.run_id).catch(() => null);
      return;
    case "session.reverted":
    case "session.unreverted":
      if (inSession) reloadSession().catch(() => null);
      return;
    default:
      return;
  }
}

function onDelta(p, inSession) {
  const kind = p.kind === "reasoning" ? "reasoning" : "text";
  const streamed = state.streamed.get(p.message_id) || { text: "", reasoning: "" };
  streamed[kind] += p.delta;
  state.streamed.set(p.message_id, streamed);
  if (!inSession) return;
  const message = state.messages.find((m) => m.id === p.message_id);
  if (!message) return; // it arrives with the fetch in flight, which merges it
  const last = message.parts[message.parts.length - 1];
  if (last && last.type === kind) {
    last.text += p.delta;
  } else {
    message.parts.push({ type: kind, text: p.delta });
  }
  renderMessage(message);
}

function onRun(type, run, inSession) {
  const session = state.sessions.find((s) => s.id === run.session_id);
  if (session && type !== "run.completed") session.is_busy = true;
  if (type === "run.completed") {
    const mark = state.lastSeq;
    api("GET", ws("/sessions")).then((sessions) => {
      state.sessions = sessions;
      replaySessions(mark);
      renderSessions();
    }).catch(() => null);
  }
  if (!inSession) {
    renderSessions();
    return;
  }
  upsert(state.runs, run, true);
  renderRuns();
  renderCancel();
  renderSessions();
  // The final records are written before run.completed: show them as stored.
  if (type === "run.completed") reloadSession().catch(() => null);
}

function upsert(list, item, newestFirst) {
  const index = list.findIndex((x) => x.id === item.id);
  if (index >= 0) list[index] = item;
  else if (newestFirst) list.unshift(item);
  else list.push(item);
}

// ---------------------------------------------------------------- actions

async function register(event) {
  event.preventDefault();
  const error = $("register-error");
  error.textContent = "";
  const path = $("workspace-path").value.trim();
  try {
    const workspace = await api("POST", "/v1/workspaces", { path });
    upsert(state.workspaces, workspace, false);
    $("workspace-path").value = "";
    await selectWorkspace(workspace.id, null);
  } catch (err) {
    error.textContent = err.message;
  }
}

function selectSession(id) {
  state.sessionId = id;
  writeHash();
  reloadSession().catch(() => null);
  renderAll();
}

async function send(event) {
  event.preventDefault();
  const error = $("prompt-error");
  error.textContent = "";
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    error.textContent = "Write a prompt first.";
    $("prompt").focus();
    return;
  }
  if (!state.workspaceId) {
    error.textContent = "Register a workspace first.";
    return;
  }
  const body = { prompt };
  if (state.sessionId) body.session_id = state.sessionId;
  const model = $("model").value;
  if (model) body.model = model;
  $("send").disabled = true;
  try {
    const run = await api("POST", ws("/agent"), body);
    $("prompt").value = "";
    if (run.session_id !== state.sessionId) {
      state.sessionId = run.session_id;
      writeHash();
      await reloadWorkspace(run.session_id);
    } else {
      upsert(state.runs, run, true);
      renderRuns();
      renderCancel();
    }
  } catch (err) {
    error.textContent = err.message;
  } finally {
    $("send").disabled = false;
  }
}

function cancellable() {
  return state.runs.find((r) => r.status === "running")
    || [...state.runs].reverse().find((r) => r.status === "queued");
}

async function cancel() {
  const run = cancellable();
  if (!run) return;
  try {
    const updated = await api("POST", ws(`/runs/${encodeURIComponent(run.id)}/cancel`));
    upsert(state.runs, updated, true);
    renderRuns();
    renderCancel();
  } catch (err) {
    $("prompt-error").textContent = err.message;
  }
}

async function decide(permission, decision, section) {
  for (const button of section.querySelectorAll("button")) button.disabled = true;
  try {
    await api("POST", ws(`/permissions/${encodeURIComponent(permission.id)}`), { decision });
  } catch (err) {
    if (err.status !== 404) {
      for (const button of section.querySelectorAll("button")) button.disabled = false;
      $("prompt-error").textContent = err.message;
      return;
    }
  }
  state.permissions = state.permissions.filter((x) => x.id !== permission.id);
  renderPermissions();
  renderSessions();
}

// ---------------------------------------------------------------- rendering

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function badge(text, kind = text) {
  return el("span", { class: `badge s-${kind}` }, text);
}

function renderAll() {
  renderWorkspaces();
  renderSessions();
  renderTitle();
  renderPermissions();
  renderConversation();
  renderRuns();
  renderCancel();
}

function renderModels() {
  const select = $("model");
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, "default"));
  for (const model of state.models) {
    select.append(el("option", { value: model.name }, model.default ? `${model.name} (default)` : model.name));
  }
  select.value = state.models.some((m) => m.name === current) ? current : "";
}

function renderWorkspaces() {
  const list = $("workspaces");
  list.replaceChildren(...state.workspaces.map((w) => el("li", {},
    el("button", {
      type: "button",
      "aria-current": w.id === state.workspaceId ? "true" : null,
      onclick: () => selectWorkspace(w.id, null).catch(() => null),
    }, w.path),
  )));
}

function renderSessions() {
  const list = $("sessions");
  const waiting = new Set(state.permissions.map((p) => p.session_id));
  list.replaceChildren(...state.sessions.map((s) => el("li", {},
    el("button", {
      type: "button",
      "aria-current": s.id === state.sessionId ? "true" : null,
      onclick: () => selectSession(s.id),
    }, s.title),
    waiting.has(s.id) ? badge("needs permission", "permission") : s.is_busy ? badge("busy", "running") : null,
  )));
  $("new-session").setAttribute("aria-current", state.sessionId ? "false" : "true");
}

function renderTitle() {
  const session = state.sessions.find((s) => s.id === state.sessionId);
  const workspace = state.workspaces.find((w) => w.id === state.workspaceId);
  $("session-title").textContent = session
    ? session.title
    : workspace ? "New session" : "Choose or register a workspace";
}

function renderPermissions() {
  const box = $("permissions");
  box.replaceChildren(...state.permissions.map((permission) => {
    const session = state.sessions.find((s) => s.id === permission.session_id);
    const section = el("section", { class: "permission", "aria-label": `Permission for ${permission.tool}` });
    section.append(...[
      el("h3", {}, `${permission.tool} wants to ${permission.action}`),
      permission.path ? el("p", {}, "Path: ", el("code", {}, permission.path)) : null,
      paramsNode(permission.params),
      session && permission.session_id !== state.sessionId ? el("p", {}, `In session “${session.title}”`) : null,
      el("div", { class: "row" },
        el("button", { type: "button", onclick: () => decide(permission, "allow", section) }, "Allow"),
        el("button", { type: "button", onclick: () => decide(permission, "allow_session", section) }, "Allow for session"),
        el("button", { type: "button", class: "quiet", onclick: () => decide(permission, "deny", section) }, "Deny"),
      ),
    ].filter(Boolean));
    return section;
  }));
}

// A tool's arguments, one per line; text shown as it is (a command, a file's content).
function paramsNode(params) {
  const entries = Object.entries(params || {});
  if (!entries.length) return null;
  const list = el("dl", { class: "params" });
  for (const [key, value] of entries) {
    list.append(el("dt", {}, key), el("dd", {}, el("pre", {}, typeof value === "string" ? value : JSON.stringify(value, null, 2))));
  }
  return list;
}

function renderConversation() {
  $("conversation").replaceChildren(...state.messages.map(messageNode));
}

function renderMessage(message) {
  const old = document.querySelector(`[data-message-id="${CSS.escape(message.id)}"]`);
  if (old) old.replaceWith(messageNode(message));
  else renderConversation();
}

function messageNode(message) {
  const who = message.role === "user" ? "You"
    : message.role === "tool" ? "Tools"
    : `Assistant${message.model ? ` · ${message.model}` : ""}`;
  const node = el("article", { class: `msg ${message.role}${message.reverted ? " reverted" : ""}`, "data-message-id": message.id, "aria-label": who },
    el("div", { class: "who" }, who, message.reverted ? " · reverted" : null));
  for (const part of message.parts) {
    const child = partNode(part);
    if (child) node.append(child);
  }
  return node;
}

function partNode(part) {
  switch (part.type) {
    case "text":
      return el("div", { class: "text" }, part.text);
    case "reasoning":
      return el("details", { class: "reasoning" }, el("summary", {}, "Reasoning"), el("div", { class: "text" }, part.text));
    case "summary":
      return el("details", { class: "summary" }, el("summary", {}, "Summary of the conversation"), el("div", { class: "text" }, part.text));
    case "tool_call":
      return el("div", { class: "tool-call" },
        el("strong", {}, `Tool call: ${part.name}`), part.finished ? null : " …",
        el("pre", {}, prettyJson(part.input)));
    case "tool_result":
      return el("div", { class: `tool-result${part.is_error ? " is-error" : ""}` },
        el("strong", {}, `${part.is_error ? "Error from" : "Result of"} ${part.name}`),
        el("pre", {}, part.content));
    case "finish":
      if (QUIET_FINISH.has(part.reason)) return null;
      return el("div", { class: `finish${part.reason === "canceled" ? "" : " bad"}` },
        `Finished: ${part.reason}${part.message ? ` — ${part.message}` : ""}${part.details ? ` (${part.details})` : ""}`);
    default:
      return null;
  }
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch (err) {
    return text;
  }
}

function renderRuns() {
  $("runs").replaceChildren(...state.runs.map((run) => {
    const retry = state.retries.get(run.id);
    const usage = run.usage || {};
    const tokens = (usage.prompt_tokens || usage.completion_tokens)
      ? `${usage.prompt_tokens} in / ${usage.completion_tokens} out` : null;
    const prompt = run.prompt.length > 80 ? `${run.prompt.slice(0, 80)}…` : run.prompt;
    return el("li", { class: "run", "data-run-id": run.id, "data-status": run.status },
      badge(run.status), " ",
      el("span", { class: "meta" }, [run.model || "default model", tokens, usage.cost_usd != null ? `$${usage.cost_usd.toFixed(4)}` : null].filter(Boolean).join(" · ")),
      retry ? el("div", { class: "s-retrying" },
        ACTIVE.has(run.status)
          ? `Retrying (attempt ${retry.attempt}, in ${Number(retry.delay_s).toFixed(1)}s): ${retry.error}`
          : `Retried ${retry.attempt}× (${retry.error})`) : null,
      el("div", {}, prompt),
      run.error && run.status !== "completed" ? el("div", { class: "error" }, run.error) : null,
      runCheckpointNodes(run),
    );
  }));
  renderUnrevert();
}

function renderCancel() {
  $("cancel").disabled = !cancellable();
}

// ---------------------------------------------------------------- checkpoints
//
// A run's diff (what its tool calls changed in the workspace's files), a
// Revert button per run (its files back as they were before it, its
// messages marked reverted) and Undo revert for the session's latest one.

function revertedRun(run) {
  const first = state.messages.find((m) => m.run_id === run.id);
  return Boolean(first && first.reverted);
}

function runCheckpointNodes(run) {
  if (run.status === "queued" || run.kind === "compact") return null;
  const shown = state.diffs.get(run.id);
  const pending = state.reverting && state.reverting.run === run.id ? state.reverting : null;
  const actions = el("div", { class: "row actions" },
    el("button", { type: "button", "aria-expanded": shown && shown.open ? "true" : "false",
      onclick: () => toggleDiff(run.id) }, "Diff"),
    revertedRun(run) ? badge("reverted", "cancelled")
      : el("button", { type: "button", disabled: ACTIVE.has(run.status) || null,
        onclick: () => revertTo(run.id, false) }, "Revert"));
  return el("div", {},
    actions,
    pending ? el("div", { class: "error", role: "alert" },
      "Changed since crushd recorded them: ", pending.files.join(", "), " ",
      el("button", { type: "button", onclick: () => revertTo(run.id, true) }, "Revert anyway")) : null,
    shown && shown.open ? diffNode(shown) : null);
}

function diffNode(shown) {
  if (shown.error) return el("div", { class: "error" }, shown.error);
  if (shown.text === null) return el("p", { class: "meta" }, "Loading the diff…");
  if (!shown.text) return el("p", { class: "meta" }, "No file changed.");
  const pre = el("pre", { class: "diff", "aria-label": "Diff" });
  for (const line of shown.text.split("\n")) {
    const kind = line.startsWith("+++") || line.startsWith("---") ? "file"
      : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : "";
    pre.append(el("span", { class: kind }, line), "\n");
  }
  return pre;
}

async function loadDiff(runId) {
  const shown = state.diffs.get(runId) || { open: true, text: null, error: null };
  state.diffs.set(runId, shown);
  try {
    shown.text = await api("GET", ws(`/runs/${encodeURIComponent(runId)}/diff`), undefined, "text");
    shown.error = null;
  } catch (err) {
    shown.error = err.message;
  }
  renderRuns();
}

function toggleDiff(runId) {
  const shown = state.diffs.get(runId);
  if (shown && shown.open) {
    shown.open = false;
    renderRuns();
    return;
  }
  state.diffs.set(runId, { open: true, text: null, error: null });
  renderRuns();
  loadDiff(runId).catch(() => null);
}

async function revertTo(runId, force) {
  const note = $("revert-note");
  note.textContent = "";
  state.reverting = null;
  try {
    const body = { run_id: runId };
    if (force) body.force = true;
    const revert = await api("POST", ws(`/sessions/${encodeURIComponent(state.sessionId)}/revert`), body);
    note.textContent = `Reverted: ${revert.files.length} files restored, ${revert.messages.length} messages reverted.`;
  } catch (err) {
    if (err.code === "workspace_changed") state.reverting = { run: runId, files: err.files };
    else note.textContent = err.message;
  }
  await reloadSession().catch(() => null);
}

async function unrevert() {
  const note = $("revert-note");
  note.textContent = "";
  try {
    const revert = await api("POST", ws(`/sessions/${encodeURIComponent(state.sessionId)}/unrevert`), {});
    note.textContent = `Revert undone: ${revert.files.length} files back.`;
  } catch (err) {
    note.textContent = err.message;
  }
  await reloadSession().catch(() => null);
}

function renderUnrevert() {
  $("unrevert").hidden = !state.messages.some((m) => m.reverted);
}

// ---------------------------------------------------------------- start

function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("register-form").addEventListener("submit", register);
  $("prompt-form").addEventListener("submit", send);
  $("cancel").addEventListener("click", cancel);
  $("unrevert").addEventListener("click", unrevert);
  $("new-session").addEventListener("click", () => {
    selectSession(null);
    $("prompt").focus();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("prompt-form").requestSubmit();
    }
  });
  loadAll().catch((err) => {
    if (err.status === 0) return; // lostConnection() is already retrying
    if (err.status !== 401) setConnection(err.message, "down");
  });
}

start();
