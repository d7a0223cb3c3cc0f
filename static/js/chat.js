// The chat page: a WebSocket for sending and live replies, fetch for uploads and
// branch switches. No inline scripts anywhere (strict CSP); all text the model
// writes arrives as plain text (deltas) or as server-sanitized HTML (render/done).
(() => {
  "use strict";
  const chat = document.getElementById("chat");
  if (!chat) return;
  const messages = document.getElementById("messages");
  const composer = document.getElementById("composer");
  const prompt = document.getElementById("prompt");
  const sendButton = document.getElementById("send");
  const errorBox = document.getElementById("composer-error");
  const fileInput = document.getElementById("file-input");
  const tray = document.getElementById("attachments");
  const modelSelect = document.getElementById("model");
  const settingsForm = document.getElementById("settings-form");
  // Every word shown comes from the page, translated (a JSON block: never executed).
  const strings = (() => { try { return JSON.parse(document.getElementById("chat-strings").textContent); } catch { return {}; } })();
  const t = (name, values) => {
    let text = strings[name] || chat.dataset["i18n" + name] || name;
    for (const [key, value] of Object.entries(values || {})) text = text.replace(`%(${key})s`, value);
    return text;
  };
  const csrf = (() => {
    try { return JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"] || ""; } catch { return ""; }
  })();

  let conversation = chat.dataset.conversation ? Number(chat.dataset.conversation) : null;
  let socket = null;
  let retry = 0;
  let pending = null;            // {clientId} of a send not yet acknowledged
  const streams = new Map();     // message id → {seq, text, html, htmlLength}
  let attachments = [];          // [{id, url, name}]

  // --- helpers ---------------------------------------------------------------
  // Per reply being written: text so far, its last sequence number, the latest
  // server-rendered HTML and how many characters of the text it covers.
  const newState = () => ({ seq: 0, text: "", reasoning: "", html: "", htmlLength: 0, lengths: new Map() });
  const showError = (text) => { errorBox.textContent = text; errorBox.hidden = !text; };
  const scrollDown = () => {
    messages.scrollTop = messages.scrollHeight;
    // On a phone the page scrolls, not the message list.
    if (messages.scrollHeight <= messages.clientHeight + 1) window.scrollTo(0, document.body.scrollHeight);
  };
  const relabel = (root) => root.querySelectorAll("button[data-copy]").forEach((button) => { button.textContent = t("Copy"); });
  const refreshTitle = async () => {
    if (!conversation) return;
    const response = await fetch(`/chat/${conversation}/title/`);
    const title = document.getElementById("chat-title");
    if (title.contains(document.activeElement)) return;  // never under the user's typing
    if (response.ok) {
      title.innerHTML = await response.text();
      if (window.htmx) window.htmx.process(title);
    }
  };
  const streamingArticle = () => messages.querySelector('article.msg[data-status="streaming"]');
  const setBusy = () => {
    const busy = Boolean(streamingArticle());
    sendButton.textContent = busy ? t("Stop") : t("Send");
    sendButton.classList.toggle("stop", busy);
  };
  // The list and the header show one title: whenever the list is refreshed, so is the header.
  const refreshList = () => { if (window.htmx) window.htmx.trigger(document.body, "refresh-list"); refreshTitle(); };
  const replaceMessages = (html) => { messages.innerHTML = html; relabel(messages); streams.clear(); markStreams(); setBusy(); scrollDown(); };
  const markStreams = () => {
    messages.querySelectorAll('article.msg[data-status="streaming"]').forEach((article) => {
      const id = Number(article.dataset.id);
      if (!streams.has(id)) streams.set(id, newState());
    });
  };
  const paint = (id) => {
    const state = streams.get(id);
    const article = document.getElementById("m" + id);
    if (!state || !article) return;
    const body = article.querySelector(".body");
    if (state.reasoning) {
      // Folded above the answer (closed unless the reader opened it), as plain text until done.
      let folded = article.querySelector("details.reasoning");
      if (!folded) {
        folded = document.createElement("details");
        folded.className = "reasoning";
        const summary = document.createElement("summary");
        summary.textContent = t("Reasoning");
        const inner = document.createElement("div");
        inner.className = "reasoning-body plain";
        folded.append(summary, inner);
        body.before(folded);
      }
      folded.querySelector(".reasoning-body").textContent = state.reasoning;
    }
    body.innerHTML = state.html;  // server-sanitized markdown of the text so far
    const tail = state.text.slice(state.htmlLength);
    if (tail) {
      const span = document.createElement("span");
      span.className = "tail";
      span.textContent = tail;     // plain text: never interpreted as HTML
      body.appendChild(span);
    }
    article.classList.add("has-text");
    relabel(body);
    scrollDown();
  };

  // --- the socket ------------------------------------------------------------
  const send = (payload) => {
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify(payload)); return true; }
    showError(t("Reconnecting"));
    return false;
  };
  const connect = () => {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + chat.dataset.ws);
    socket.addEventListener("open", () => {
      retry = 0;
      chat.classList.remove("offline");
      if (errorBox.textContent === t("Reconnecting")) showError("");
      if (conversation) send({ action: "open", conversation });
    });
    socket.addEventListener("message", (event) => handle(JSON.parse(event.data)));
    socket.addEventListener("close", (event) => {
      chat.classList.add("offline");
      if (event.code === 4401 || event.code === 4403) { location.reload(); return; }
      retry = Math.min(retry + 1, 6);
      setTimeout(connect, 250 * 2 ** retry);  // back off: 0.5 s … 16 s
    });
  };

  const handle = (data) => {
    switch (data.type) {
      case "created":
        conversation = data.conversation;
        chat.dataset.conversation = String(conversation);
        history.replaceState(null, "", data.url);
        document.querySelectorAll('input[name="next"]').forEach((input) => { input.value = data.url; });
        settingsForm.setAttribute("action", data.url + "settings/");
        document.getElementById("current-conversation").value = String(conversation);
        refreshTitle();
        saveSettings();
        refreshList();
        break;
      case "messages":
        if (pending && data.client_id === pending.clientId) {
          prompt.value = ""; autosize(); clearAttachments(); pending = null; showError("");
        }
        replaceMessages(data.html);
        break;
      case "snapshot": {
        const state = streams.get(data.message) || newState();
        if (data.seq >= state.seq) { state.seq = data.seq; state.text = data.text; state.reasoning = data.reasoning || ""; state.html = ""; state.htmlLength = 0; state.lengths.set(data.seq, data.text.length); }
        streams.set(data.message, state);
        paint(data.message);
        break;
      }
      case "delta":
      case "reasoning": {
        // One sequence for both: a piece of the answer, or of the reasoning before it.
        const state = streams.get(data.message);
        if (!state) { send({ action: "open", conversation }); break; }  // joined mid-reply: get a snapshot
        if (data.seq <= state.seq) break;              // already in the snapshot
        if (data.seq > state.seq + 1) {                // a gap: ask for a fresh snapshot
          send({ action: "open", conversation });
          break;
        }
        state.seq = data.seq;
        if (data.type === "reasoning") state.reasoning += data.text; else state.text += data.text;
        state.lengths.set(data.seq, state.text.length);
        paint(data.message);
        break;
      }
      case "render": {
        const state = streams.get(data.message);
        const length = state ? state.lengths.get(data.seq) : undefined;
        if (length === undefined) break;   // a render of text this tab has not seen
        state.html = data.html;
        state.htmlLength = length;
        paint(data.message);
        break;
      }
      case "left_out": {
        const article = document.getElementById("m" + data.message);
        if (article && !article.querySelector(".note")) {
          const note = document.createElement("p");
          note.className = "note";
          note.textContent = t("LeftOut") + " " + data.count;
          article.prepend(note);
        }
        break;
      }
      case "done": {
        streams.delete(data.message);
        const article = document.getElementById("m" + data.message);
        // A reasoning fold the reader opened while the reply streamed stays open.
        const opened = article && article.querySelector("details.reasoning[open]");
        if (article) article.outerHTML = data.html;
        const fold = opened && document.querySelector(`#m${data.message} details.reasoning`);
        if (fold) fold.open = true;
        relabel(messages);
        setBusy();
        scrollDown();
        refreshList();
        break;
      }
      case "title":
        refreshList();
        break;
      case "opened":
        // Subscribed now: a title given while this page loaded (before it listened) shows.
        if (data.conversation === conversation) refreshList();
        break;
      case "error":
        if (!data.client_id || (pending && data.client_id === pending.clientId)) pending = null;
        showError(data.error);   // the typed text stays in the box
        break;
    }
  };

  // --- composing -------------------------------------------------------------
  const autosize = () => { prompt.style.height = "auto"; prompt.style.height = Math.min(prompt.scrollHeight, 240) + "px"; };
  const submit = () => {
    const streaming = streamingArticle();
    if (streaming) { send({ action: "stop", message: Number(streaming.dataset.id) }); return; }
    const text = prompt.value.trim();
    if (!text && !attachments.length) return;
    if (attachments.length && !visionOk()) { showError(noVision()); return; }  // nothing sent, nothing lost
    const clientId = Math.random().toString(36).slice(2);
    const payload = { action: "send", conversation, text, attachments: attachments.map((a) => a.id), model: modelSelect ? modelSelect.value : null, client_id: clientId };
    if (!conversation) {
      // A new conversation has no settings URL yet: its first reply needs them in the send itself.
      payload.system_prompt = settingsForm.elements.system_prompt.value;
      payload.temperature = settingsForm.elements.temperature.value || null;
    }
    pending = { clientId };
    if (!send(payload)) pending = null;
  };
  composer.addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  prompt.addEventListener("input", autosize);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); submit(); }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    const streaming = streamingArticle();
    if (streaming) { event.preventDefault(); send({ action: "stop", message: Number(streaming.dataset.id) }); }
  });

  // --- attachments: button, paste, drag and drop ----------------------------
  const visionOk = () => !modelSelect || !modelSelect.selectedOptions[0] || modelSelect.selectedOptions[0].dataset.vision === "1";
  // The server's words when it refuses such a send (chatapp.chat.actions): the image stays
  // attached and the text typed, so the user can remove the image or pick another model.
  const noVision = () => t("NoVision", { model: modelSelect.selectedOptions[0].dataset.label || modelSelect.value });
  const checkVision = () => { if (attachments.length && !visionOk()) showError(noVision()); else if (errorBox.dataset.vision === "1") showError(""); errorBox.dataset.vision = attachments.length && !visionOk() ? "1" : ""; };
  const renderTray = () => {
    tray.replaceChildren(...attachments.map((item) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = item.url; img.alt = item.name || "";
      const remove = document.createElement("button");
      remove.type = "button"; remove.className = "remove"; remove.textContent = "×"; remove.setAttribute("aria-label", t("RemoveImage"));
      remove.addEventListener("click", () => { attachments = attachments.filter((a) => a !== item); renderTray(); checkVision(); });
      figure.append(img, remove);
      return figure;
    }));
    tray.hidden = attachments.length === 0;
  };
  const clearAttachments = () => { attachments = []; renderTray(); };
  const upload = async (files) => {
    for (const file of files) {
      if (!file.type.startsWith("image/")) { showError(t("NotImage", { name: file.name })); continue; }
      const body = new FormData();
      body.append("file", file);
      const response = await fetch(chat.dataset.uploadUrl, { method: "POST", body, headers: { "X-CSRFToken": csrf } });
      const data = await response.json().catch(() => ({ error: t("UploadFailed") }));
      if (!response.ok) { showError(data.error || t("UploadFailed")); continue; }
      attachments.push(data); renderTray(); showError("");
      checkVision();
    }
  };
  if (modelSelect) modelSelect.addEventListener("change", checkVision);
  fileInput.addEventListener("change", () => { upload([...fileInput.files]); fileInput.value = ""; });
  prompt.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])];
    if (files.length) { event.preventDefault(); upload(files); }
  });
  chat.addEventListener("dragover", (event) => { event.preventDefault(); chat.classList.add("dropping"); });
  chat.addEventListener("dragleave", () => chat.classList.remove("dropping"));
  chat.addEventListener("drop", (event) => {
    event.preventDefault(); chat.classList.remove("dropping");
    upload([...(event.dataTransfer ? event.dataTransfer.files : [])]);
  });

  // --- message actions -------------------------------------------------------
  const copy = async (text, button) => {
    try { await navigator.clipboard.writeText(text); } catch { return; }
    const label = button.textContent; button.textContent = t("Copied"); setTimeout(() => { button.textContent = label; }, 1200);
  };
  messages.addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const article = button.closest("article.msg");
    const id = article ? Number(article.dataset.id) : null;
    if (button.hasAttribute("data-copy")) {
      const code = button.closest(".codeblock").querySelector("pre");
      copy(code ? code.innerText : "", button);
    } else if (button.hasAttribute("data-copy-message")) {
      // The message as written (a reply's raw Markdown), not the rendered page text.
      const source = article.querySelector("template.source");
      copy(source ? source.content.textContent : article.querySelector(".body").innerText, button);
    } else if (button.hasAttribute("data-stop")) {
      send({ action: "stop", message: id });
    } else if (button.hasAttribute("data-regenerate")) {
      send({ action: "regenerate", message: id });
    } else if (button.hasAttribute("data-switch") && button.dataset.switch) {
      const url = chat.dataset.switchUrl.replace("/0/", `/${button.dataset.switch}/`);
      const response = await fetch(url, { method: "POST", headers: { "X-CSRFToken": csrf } });
      // A refusal (the conversation busy, the version gone) is said in the server's
      // words, as a send's is; any other failure (an error page) in the page's own.
      if (response.ok) { replaceMessages(await response.text()); showError(""); }
      else showError(response.headers.get("X-Chat-Refusal") ? await response.text() : t("SwitchFailed"));
    } else if (button.hasAttribute("data-edit")) {
      startEdit(article, id);
    }
  });
  const startEdit = (article, id) => {
    if (article.querySelector("form.editor")) return;
    const body = article.querySelector(".body");
    const source = article.querySelector("template.source");
    const editor = document.createElement("form");
    editor.className = "editor";
    const area = document.createElement("textarea");
    area.value = source ? source.content.textContent : body.innerText;
    area.setAttribute("aria-label", t("EditMessage"));
    const grow = () => { area.style.height = "auto"; area.style.height = Math.min(area.scrollHeight + 2, 320) + "px"; };
    const buttons = document.createElement("div"); buttons.className = "editor-actions";
    const cancel = document.createElement("button"); cancel.type = "button"; cancel.className = "cancel"; cancel.textContent = t("Cancel");
    const save = document.createElement("button"); save.type = "submit"; save.className = "save"; save.textContent = t("Save");
    buttons.append(cancel, save);
    editor.append(area, buttons);
    // While editing, the message's other actions are hidden (CSS: .msg.editing).
    body.hidden = true; article.classList.add("editing"); article.insertBefore(editor, body.nextSibling);
    grow(); area.addEventListener("input", grow); area.focus();
    const close = () => { editor.remove(); body.hidden = false; article.classList.remove("editing"); };
    cancel.addEventListener("click", close);
    area.addEventListener("keydown", (event) => { if (event.key === "Escape") { event.stopPropagation(); close(); } });
    editor.addEventListener("submit", (event) => {
      event.preventDefault();
      const clientId = Math.random().toString(36).slice(2);
      send({ action: "edit", message: id, text: area.value, client_id: clientId });
    });
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); editor.requestSubmit(); }
    });
  };

  // --- settings and deletion -------------------------------------------------
  const saveSettings = () => {
    if (!conversation) return;
    const body = new FormData(settingsForm);
    fetch(settingsForm.getAttribute("action"), { method: "POST", body, headers: { "X-CSRFToken": csrf } })
      .then(async (response) => {
        if (response.ok) return;
        const errors = await response.json().then((data) => Object.values(data.errors || {}).flat().join(" ")).catch(() => "");
        showError(t("SettingsFailed", { errors }));
      });
  };
  settingsForm.addEventListener("change", saveSettings);
  // The header's model picker belongs to the settings form (form="settings-form") but
  // sits outside it: its change does not bubble to the form.
  const remembered = "switchboard.chat.model";
  if (modelSelect) {
    modelSelect.addEventListener("change", () => {
      try { localStorage.setItem(remembered, modelSelect.value); } catch { /* private mode */ }
      saveSettings();
    });
    // A new chat starts with the model this browser last picked, if it is still offered;
    // else with the default an admin chose (already selected by the server).
    let last = null;
    try { last = localStorage.getItem(remembered); } catch { /* private mode */ }
    if (!conversation && last && [...modelSelect.options].some((option) => option.value === last)) modelSelect.value = last;
  }

  // --- phone: the conversation list is a drawer ------------------------------
  const menuButton = document.getElementById("menu-button");
  const backdrop = document.getElementById("drawer-backdrop");
  const sidebar = document.getElementById("sidebar");
  const layout = chat.parentElement;
  const drawer = (open) => {
    layout.classList.toggle("drawer-open", open);
    menuButton.setAttribute("aria-expanded", String(open));
    backdrop.hidden = !open;
    if (open) { const first = sidebar.querySelector("a, input"); if (first) first.focus(); } else if (document.activeElement && sidebar.contains(document.activeElement)) menuButton.focus();
  };
  if (menuButton && backdrop && sidebar) {
    menuButton.addEventListener("click", () => drawer(!layout.classList.contains("drawer-open")));
    backdrop.addEventListener("click", () => drawer(false));
    document.addEventListener("keydown", (event) => { if (event.key === "Escape" && layout.classList.contains("drawer-open")) drawer(false); });
  }
  // The on-screen keyboard shrinks the visual viewport, not the layout one: size the
  // page to what is visible so the composer stays above the keyboard.
  if (window.visualViewport) {
    // Times the zoom: pinching in must not shrink the page, only the keyboard does.
    const fit = () => document.documentElement.style.setProperty("--chat-viewport", Math.round(window.visualViewport.height * window.visualViewport.scale) + "px");
    window.visualViewport.addEventListener("resize", fit);
    fit();
  }
  settingsForm.addEventListener("submit", (event) => { event.preventDefault(); saveSettings(); });
  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-confirm]");
    if (button && !window.confirm(button.dataset.confirm)) event.preventDefault();
  });

  markStreams();
  relabel(messages);
  setBusy();
  scrollDown();
  connect();
})();
