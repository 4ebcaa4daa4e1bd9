// The chat page of `minicpm serve`: one module, no build step, no request to any other host.
//
// Contract:
// - The server's OpenAI-compatible API is called with relative URLs (the page works behind a proxy
//   that serves it under a sub-path): GET v1/models (model name, max_model_len, sampling defaults),
//   POST tokenize (the context counter), POST v1/chat/completions (streamed, with usage).
// - Conversations, the settings the user changed (sampling, system prompt) and the API key live in
//   this browser's localStorage; nothing else keeps them. Sampling fields left empty are not sent,
//   so the server's defaults apply.
// - A 401 opens the key dialog; a key is kept only once the server accepted it.
// - Model output is rendered by render.js (sanitized Markdown), never as markup that runs.

import { documentBlock, readDocument } from "./documents.js";
import { renderMarkdown } from "./render.js";

const STORE = { chats: "minicpm.chats", current: "minicpm.current", settings: "minicpm.settings", key: "minicpm.apiKey" };
const SAMPLING = ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"];
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), chats: $("chats"), chatList: $("chat-list"), toggleChats: $("toggle-chats"),
  newChat: $("new-chat"), messages: $("messages"), empty: $("empty"), composer: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), fileInput: $("file-input"),
  attachments: $("attachments"), context: $("context"), status: $("status"), dropHint: $("drop-hint"),
  main: $("main"), settings: $("settings"), settingsForm: $("settings-form"), openSettings: $("open-settings"),
  systemPrompt: $("system-prompt"), resetSettings: $("reset-settings"), forgetKey: $("forget-key"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("api-key"), keyMessage: $("key-message"),
  keyError: $("key-error"),
};

// ------------------------------------------------------------------------------------ state
const server = { model: null, maxLen: null, defaults: {} };
const state = {
  chats: readJson(STORE.chats, []),
  currentId: localStorage.getItem(STORE.current),
  settings: readJson(STORE.settings, {}),
  key: localStorage.getItem(STORE.key),
  attachments: [], // documents waiting for the next message: {name, text}
  busy: false, // an answer is streaming
  checking: false, // a send's tokens are being counted
  controller: null,
  armed: null, // a send the user was warned about: pressing Send again goes ahead
};

function readJson(name, fallback) {
  const raw = localStorage.getItem(name);
  if (raw === null) return fallback;
  try {
    return JSON.parse(raw);
  } catch (err) {
    console.warn(`ignoring unreadable ${name} in localStorage: ${err.message}`);
    return fallback;
  }
}

function save() {
  try {
    localStorage.setItem(STORE.chats, JSON.stringify(state.chats));
    if (state.currentId) localStorage.setItem(STORE.current, state.currentId);
    else localStorage.removeItem(STORE.current);
    localStorage.setItem(STORE.settings, JSON.stringify(state.settings));
  } catch (err) {
    if (err.name !== "QuotaExceededError") throw err;
    setStatus("This browser's storage is full: the conversation is not saved. Delete old conversations.", true);
  }
}

const currentChat = () => state.chats.find((c) => c.id === state.currentId) || null;

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

// ------------------------------------------------------------------------------------ the API
class AuthError extends Error {}

async function api(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const init = body === undefined ? { headers, signal } : { method: "POST", headers, body: JSON.stringify(body), signal };
  const response = await fetch(path, init);
  if (response.status === 401) throw new AuthError("the server wants an API key");
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return `${response.status} ${response.statusText}: ${text.slice(0, 200)}`;
  }
}

/** Run ``call``; on a 401 ask for the key (until the server takes one), then run it again. */
async function withKey(call) {
  for (;;) {
    try {
      return await call();
    } catch (err) {
      if (!(err instanceof AuthError)) throw err;
      await askForKey(Boolean(state.key));
    }
  }
}

let keyWaiters = [];

function askForKey(refused) {
  ui.keyMessage.textContent = refused
    ? "The server refused the API key kept in this browser. Enter the right one."
    : "This server needs an API key.";
  ui.keyError.textContent = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

async function submitKey(event) {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  ui.keyError.textContent = "Checking…";
  const response = await fetch("v1/models", { headers: { Authorization: `Bearer ${key}` } });
  if (response.status === 401) {
    ui.keyError.textContent = "Wrong key: the server refused it. Check it and try again.";
    ui.keyInput.select();
    return;
  }
  if (!response.ok) {
    ui.keyError.textContent = await errorText(response);
    return;
  }
  state.key = key;
  localStorage.setItem(STORE.key, key);
  ui.forgetKey.hidden = false;
  ui.keyInput.value = "";
  ui.keyDialog.close();
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve();
}

async function loadModel() {
  const response = await api("v1/models");
  const card = (await response.json()).data[0];
  server.model = card.id;
  server.maxLen = card.max_model_len;
  server.defaults = card.sampling_defaults || {};
  ui.model.textContent = `${card.id} · ${card.max_model_len.toLocaleString("en")}-token context`;
  document.title = `${card.id} · minicpm chat`;
  fillSettings();
}

/** The server-sent events of a response, as the text of each ``data:`` line. */
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) yield data;
    }
  }
}

// ------------------------------------------------------------------------------------ requests
function systemPrompt() {
  return (state.settings.system || "").trim();
}

/** A message as the API takes it: a user message carries its documents before its text. */
function apiMessage(message) {
  if (message.role !== "user" || !message.docs?.length) return { role: message.role, content: message.content };
  const blocks = message.docs.map(documentBlock);
  return { role: "user", content: [...blocks, message.content].filter(Boolean).join("\n\n") };
}

function apiMessages(messages) {
  const out = systemPrompt() ? [{ role: "system", content: systemPrompt() }] : [];
  for (const m of messages) {
    if (m.role === "assistant" && !m.content) continue; // an answer that failed before its first token
    out.push(apiMessage(m));
  }
  return out;
}

function samplingFields() {
  const fields = {};
  for (const name of SAMPLING) if (typeof state.settings[name] === "number") fields[name] = state.settings[name];
  return fields;
}

async function countTokens(messages) {
  const body = { model: server.model, messages: apiMessages(messages), add_generation_prompt: true };
  const response = await withKey(() => api("tokenize", body));
  return (await response.json()).count;
}

// ------------------------------------------------------------------------------------ context
let contextSeq = 0;
let contextTimer = null;

function draftMessages() {
  const chat = currentChat();
  const messages = chat ? [...chat.messages] : [];
  const text = ui.prompt.value;
  if (text.trim() || state.attachments.length) messages.push({ role: "user", content: text, docs: state.attachments });
  return messages;
}

function scheduleContext(delay = 300) {
  clearTimeout(contextTimer);
  contextTimer = setTimeout(updateContext, delay);
}

async function updateContext() {
  if (server.maxLen === null) return;
  const seq = ++contextSeq;
  const messages = draftMessages();
  let count = 0;
  if (messages.length || systemPrompt()) {
    try {
      count = await countTokens(messages);
    } catch (err) {
      if (seq === contextSeq) ui.context.textContent = `Context: not counted (${err.message})`;
      return;
    }
  }
  if (seq !== contextSeq) return; // a newer count is on its way
  const share = count / server.maxLen;
  ui.context.textContent = `Context: ${count.toLocaleString("en")} / ${server.maxLen.toLocaleString("en")} tokens`;
  ui.context.dataset.count = String(count);
  ui.context.classList.toggle("warn", share >= 0.85 && share < 1);
  ui.context.classList.toggle("over", share >= 1);
}

// ------------------------------------------------------------------------------------ sending
async function send() {
  if (state.busy || state.checking) return;
  const text = ui.prompt.value;
  const docs = state.attachments;
  if (!text.trim() && !docs.length) return;
  const chat = currentChat();
  const messages = [...(chat ? chat.messages : []), { role: "user", content: text, docs }];
  if (!(await fits(messages, `${text}\u0000${docs.map((d) => d.name).join()}`))) return;
  const target = chat || startChat();
  target.messages.push({ role: "user", content: text, docs });
  if (!target.title) target.title = titleOf(text, docs);
  ui.prompt.value = "";
  state.attachments = [];
  renderAttachments();
  await generate(target);
}

/** Whether a send of ``messages`` should go ahead: refused when the prompt alone fills the context,
 * warned (send again to go ahead) when little room is left for the answer. */
async function fits(messages, signature) {
  let count;
  state.checking = true; // one send at a time, also while its tokens are counted
  try {
    count = await countTokens(messages);
  } catch (err) {
    setStatus(`Could not count the tokens: ${err.message}`, true);
    return false;
  } finally {
    state.checking = false;
  }
  const room = server.maxLen - count;
  const wanted = state.settings.max_tokens || 256;
  if (room <= 0) {
    setStatus(
      `Too long to send: ${count.toLocaleString("en")} tokens, and the model takes ${server.maxLen.toLocaleString("en")}` +
        " in all. Remove a document or start a new chat.",
      true,
    );
    state.armed = null;
    return false;
  }
  if (room < wanted && state.armed !== signature) {
    setStatus(
      `Only ${room.toLocaleString("en")} tokens are left for the answer (${count.toLocaleString("en")} of ` +
        `${server.maxLen.toLocaleString("en")} used): it may be cut short. Press Send again to send anyway.`,
      true,
    );
    state.armed = signature;
    return false;
  }
  state.armed = null;
  setStatus("");
  return true;
}

function startChat() {
  const chat = { id: newId(), title: "", created: Date.now(), messages: [] };
  state.chats.unshift(chat);
  state.currentId = chat.id;
  return chat;
}

function titleOf(text, docs) {
  const line = text.trim().split("\n")[0] || docs.map((d) => d.name).join(", ");
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

async function generate(chat) {
  const answer = { role: "assistant", content: "", model: server.model };
  const body = {
    model: server.model,
    messages: apiMessages(chat.messages),
    stream: true,
    stream_options: { include_usage: true },
    ...samplingFields(),
  };
  chat.messages.push(answer);
  chat.updated = Date.now();
  setBusy(true);
  save();
  renderChat();
  const view = ui.messages.lastElementChild;
  const controller = new AbortController();
  state.controller = controller;
  const started = performance.now();
  let first = null;
  let deltas = 0;
  let usage = null;
  let lastSave = started;
  try {
    const response = await withKey(() => api("v1/chat/completions", body, controller.signal));
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (choice?.finish_reason) answer.finish = choice.finish_reason;
      const delta = choice?.delta?.content;
      if (!delta) continue;
      first ??= performance.now();
      deltas += 1;
      answer.content += delta;
      paint(view, answer);
      if (performance.now() - lastSave > 1000) {
        save();
        lastSave = performance.now();
      }
    }
  } catch (err) {
    if (err.name === "AbortError") answer.stopped = true;
    else answer.error = err.message;
  } finally {
    const end = performance.now();
    const tokens = usage?.completion_tokens ?? deltas;
    answer.stats = {
      ttft: first === null ? null : (first - started) / 1000,
      tokens,
      tps: first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null,
    };
    state.controller = null;
    setBusy(false);
    save();
    renderChat();
    scheduleContext(0);
    ui.prompt.focus();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function setBusy(busy) {
  state.busy = busy;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.messages.setAttribute("aria-busy", String(busy));
  document.body.classList.toggle("busy", busy);
  if (busy) setStatus("Answering… (Esc stops)");
  else if (ui.status.textContent.startsWith("Answering")) setStatus("");
}

let paintPending = false;

function paint(view, answer) {
  if (paintPending) return;
  paintPending = true;
  requestAnimationFrame(() => {
    paintPending = false;
    renderMarkdown(view.querySelector(".body"), answer.content, false);
    view.dataset.state = "streaming";
    keepScrolled();
  });
}

function keepScrolled() {
  const el = document.scrollingElement;
  if (el.scrollHeight - el.scrollTop - el.clientHeight < 200) window.scrollTo(0, el.scrollHeight);
}

// ------------------------------------------------------------------------------------ actions
async function regenerate() {
  const chat = currentChat();
  if (!chat || state.busy) return;
  if (chat.messages.at(-1)?.role === "assistant") chat.messages.pop();
  await generate(chat);
}

async function resend(index, text) {
  const chat = currentChat();
  if (!chat || state.busy || state.checking) return;
  const edited = { ...chat.messages[index], content: text };
  const messages = [...chat.messages.slice(0, index), edited];
  if (!(await fits(messages, `edit\u0000${index}\u0000${text}`))) return;
  chat.messages = messages;
  await generate(chat);
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // no clipboard API (a page served over plain http from another machine): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

/** Show conversation ``id`` (null: a new one, created when its first message is sent). */
function selectChat(id) {
  if (state.busy) stop();
  state.currentId = id;
  save();
  renderAll();
  closeChatsOnPhone();
  ui.prompt.focus();
}

function deleteChat(id) {
  if (state.busy && id === state.currentId) stop();
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  save();
  renderAll();
}

function closeChatsOnPhone() {
  ui.chats.classList.remove("open");
  ui.toggleChats.setAttribute("aria-expanded", "false");
}

// ------------------------------------------------------------------------------------ documents
async function attach(files) {
  for (const file of files) {
    setStatus(`Reading ${file.name}…`);
    try {
      const doc = await readDocument(file);
      state.attachments = [...state.attachments, doc];
      setStatus(`Attached ${doc.name} (${doc.text.length.toLocaleString("en")} characters).`);
    } catch (err) {
      setStatus(err.message, true);
    }
  }
  renderAttachments();
  scheduleContext(0);
}

function renderAttachments() {
  ui.attachments.replaceChildren(
    ...state.attachments.map((doc, i) => {
      const item = el("li", { className: "chip" }, [el("span", { textContent: doc.name })]);
      const remove = el("button", { type: "button", textContent: "×", title: `Remove ${doc.name}` });
      remove.setAttribute("aria-label", `Remove ${doc.name}`);
      remove.addEventListener("click", () => {
        state.attachments = state.attachments.filter((_, j) => j !== i);
        renderAttachments();
        scheduleContext(0);
        ui.prompt.focus();
      });
      item.append(remove);
      return item;
    }),
  );
}

// ------------------------------------------------------------------------------------ rendering
function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function renderAll() {
  renderChatList();
  renderChat();
  scheduleContext(0);
}

function renderChatList() {
  ui.chatList.replaceChildren(
    ...state.chats.map((chat) => {
      const open = el("button", { type: "button", className: "chat-title", textContent: chat.title || "New chat" });
      if (chat.id === state.currentId) open.setAttribute("aria-current", "page");
      open.addEventListener("click", () => selectChat(chat.id));
      const remove = el("button", { type: "button", className: "icon-button", textContent: "×", title: "Delete" });
      remove.setAttribute("aria-label", `Delete conversation: ${chat.title || "New chat"}`);
      remove.addEventListener("click", () => deleteChat(chat.id));
      return el("li", {}, [open, remove]);
    }),
  );
}

function renderChat() {
  const chat = currentChat();
  const messages = chat ? chat.messages : [];
  ui.empty.hidden = messages.length > 0;
  const lastAnswer = messages.findLastIndex((m) => m.role === "assistant");
  ui.messages.replaceChildren(...messages.map((m, i) => messageView(m, i, i === lastAnswer)));
  renderChatList();
  keepScrolled();
}

function messageView(message, index, isLastAnswer) {
  const who = message.role === "user" ? "You" : message.model || server.model || "Model";
  const view = el("article", { className: `message ${message.role}` });
  view.setAttribute("aria-label", `${message.role === "user" ? "You" : "Answer"}, message ${index + 1}`);
  view.dataset.role = message.role;
  view.append(el("h2", { className: "who", textContent: who }));
  if (message.docs?.length) view.append(docsView(message.docs));
  const body = el("div", { className: "body" });
  if (message.role === "user") body.append(...paragraphs(message.content));
  else renderMarkdown(body, message.content, true);
  view.append(body);
  if (message.role === "assistant") {
    const done = message.stats !== undefined;
    view.dataset.state = done ? "done" : "waiting";
    if (!done && !message.content) body.append(el("p", { className: "typing", textContent: "…" }));
    if (message.error) view.append(el("p", { className: "error", role: "alert", textContent: message.error }));
    if (message.stopped) view.append(el("p", { className: "note", textContent: "Stopped." }));
    if (message.finish === "length") view.append(el("p", { className: "note", textContent: "Cut at the token limit." }));
    if (done) view.append(statsView(message.stats));
  }
  if (message.stats !== undefined || message.role === "user") view.append(actionsView(message, index, isLastAnswer));
  return view;
}

function paragraphs(text) {
  return text.split(/\n{2,}/).map((p) => el("p", { textContent: p }));
}

function docsView(docs) {
  return el(
    "div",
    { className: "docs" },
    docs.map((doc) => {
      const details = el("details", { className: "doc" }, [
        el("summary", { textContent: `${doc.name} (${doc.text.length.toLocaleString("en")} characters)` }),
        el("pre", { className: "doc-text", textContent: doc.text }),
      ]);
      return details;
    }),
  );
}

function statsView(stats) {
  const parts = [];
  if (stats.ttft !== null) parts.push(`first token ${stats.ttft.toFixed(2)} s`);
  if (stats.tps !== null) parts.push(`${stats.tps.toFixed(1)} tokens/s`);
  if (stats.tokens) parts.push(`${stats.tokens} tokens`);
  return el("p", { className: "stats", textContent: parts.join(" · ") });
}

function actionsView(message, index, isLastAnswer) {
  const bar = el("div", { className: "actions" });
  const button = (label, action, extra = {}) => {
    const b = el("button", { type: "button", textContent: label, ...extra });
    b.addEventListener("click", () => action(b));
    bar.append(b);
    return b;
  };
  button("Copy", (b) => copyText(message.content, b), { title: "Copy the text" });
  if (message.role === "user") button("Edit", () => editInPlace(index), { title: "Edit and send again" });
  if (isLastAnswer) button("Regenerate", regenerate, { title: "Answer this again" });
  for (const b of bar.children) b.setAttribute("aria-label", `${b.textContent} message ${index + 1}`);
  return bar;
}

function editInPlace(index) {
  if (state.busy) return;
  const view = ui.messages.children[index];
  const message = currentChat().messages[index];
  const area = el("textarea", { className: "edit", value: message.content, rows: 3 });
  area.setAttribute("aria-label", "Edit the message");
  const sendButton = el("button", { type: "button", className: "primary", textContent: "Send" });
  const cancel = el("button", { type: "button", textContent: "Cancel" });
  const form = el("div", { className: "edit-form" }, [area, el("div", { className: "actions" }, [sendButton, cancel])]);
  view.querySelector(".body").replaceWith(form);
  view.querySelector(":scope > .actions")?.remove();
  sendButton.addEventListener("click", () => resend(index, area.value));
  cancel.addEventListener("click", renderChat);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      resend(index, area.value);
    } else if (e.key === "Escape") {
      e.stopPropagation();
      renderChat();
    }
  });
  area.focus();
}

// ------------------------------------------------------------------------------------ settings
function fillSettings() {
  ui.systemPrompt.value = state.settings.system || "";
  for (const name of SAMPLING) {
    const input = $(name);
    const fallback = server.defaults[name];
    input.placeholder = fallback === undefined ? (name === "max_tokens" ? "up to the context" : "server default") : String(fallback);
    input.value = typeof state.settings[name] === "number" ? String(state.settings[name]) : fallback ?? "";
  }
  ui.forgetKey.hidden = !state.key;
}

function readSettings() {
  const system = ui.systemPrompt.value;
  if (system.trim()) state.settings.system = system;
  else delete state.settings.system;
  for (const name of SAMPLING) {
    const input = $(name);
    const value = input.value === "" ? NaN : Number(input.value);
    if (Number.isNaN(value) || !input.checkValidity() || value === server.defaults[name]) delete state.settings[name];
    else state.settings[name] = value;
  }
  save();
  scheduleContext(0);
}

// ------------------------------------------------------------------------------------ wiring
function bind() {
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  ui.prompt.addEventListener("input", () => scheduleContext());
  ui.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.busy && !document.querySelector("dialog[open]")) {
      e.preventDefault();
      stop();
    }
  });
  ui.newChat.addEventListener("click", () => selectChat(null)); // the chat starts with its first message
  ui.toggleChats.addEventListener("click", () => {
    const open = ui.chats.classList.toggle("open");
    ui.toggleChats.setAttribute("aria-expanded", String(open));
    if (open) ui.newChat.focus();
  });
  ui.fileInput.addEventListener("change", async () => {
    await attach([...ui.fileInput.files]);
    ui.fileInput.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    window.addEventListener(type, (e) => {
      e.preventDefault();
      ui.dropHint.hidden = false;
    });
  }
  window.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) ui.dropHint.hidden = true;
  });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    ui.dropHint.hidden = true;
    if (e.dataTransfer?.files?.length) attach([...e.dataTransfer.files]);
  });
  ui.openSettings.addEventListener("click", () => {
    fillSettings();
    ui.settings.showModal();
  });
  ui.settings.addEventListener("close", readSettings);
  ui.resetSettings.addEventListener("click", () => {
    for (const name of SAMPLING) delete state.settings[name];
    fillSettings();
  });
  ui.forgetKey.addEventListener("click", () => {
    state.key = null;
    localStorage.removeItem(STORE.key);
    ui.forgetKey.hidden = true;
  });
  ui.keyForm.addEventListener("submit", (e) => submitKey(e).catch((err) => (ui.keyError.textContent = err.message)));
  ui.keyDialog.addEventListener("cancel", (e) => e.preventDefault()); // nothing works without a key
}

async function main() {
  bind();
  renderAll();
  try {
    await withKey(loadModel);
  } catch (err) {
    ui.model.textContent = "not connected";
    setStatus(`Could not reach the server: ${err.message}`, true);
    return;
  }
  ui.send.disabled = false;
  scheduleContext(0);
  document.body.dataset.ready = "true";
}

// for tests and the curious: the renderer the page uses for answers
window.minicpmChat = { renderMarkdown };
main();
