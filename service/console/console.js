// relay console: a seed-protocol WebSocket client in plain JavaScript (no build step, no dependencies).
//
// Connect to ws(s)://<this host>/<group>; the first frame is {"message": {"channel_id": ...}}.
// Publish {"task": "send_message_to_group", "group_name": G, ...}; direct-send
// {"task": "send_message_to_channel", "channel_id": C, ...}; every delivery is {"message": <object>}.
"use strict";

(() => {
  // The relay's close codes (service/protocol.py CloseCode, DESIGN.md section 6), plus the two a
  // browser reports by itself (1005, 1006). tests/test_console.py checks every CloseCode is here.
  const CLOSE_CODES = [
    { code: 1000, name: "Normal closure", meaning: "The socket was closed on purpose.", reconnect: false },
    { code: 1001, name: "Going away", meaning: "The server is shutting down.", reconnect: true },
    { code: 1005, name: "No code", meaning: "Closed without a code (set by the browser).", reconnect: true },
    {
      code: 1006,
      name: "Connection lost",
      meaning: "No close frame: the network dropped, the pod died or could not be reached (set by the browser).",
      reconnect: true,
    },
    {
      code: 1008,
      name: "Policy violation",
      meaning: "This page's Origin is not in the pod's RELAY_ALLOWED_ORIGINS.",
      reconnect: false,
    },
    { code: 1009, name: "Frame too big", meaning: "A frame sent was over the pod's RELAY_MAX_FRAME_BYTES.", reconnect: true },
    { code: 1011, name: "Internal error", meaning: "The relay hit an unexpected error.", reconnect: true },
    {
      code: 1012,
      name: "Service restart",
      meaning: "The pod is draining (a deploy or scale-down); a new connection reaches another pod.",
      reconnect: true,
    },
    {
      code: 1013,
      name: "Try again later",
      meaning: "The pod is full, new sockets arrive too fast, or its broker is down.",
      reconnect: true,
    },
    {
      code: 4001,
      name: "Token expired",
      meaning: "The token reached its expiry: paste a fresh token, then connect again.",
      reconnect: false,
    },
    {
      code: 4008,
      name: "Slow consumer",
      meaning: "This socket fell too many frames behind (RELAY_OUTBOX_SIZE).",
      reconnect: true,
    },
    {
      code: 4029,
      name: "Rate limited",
      meaning: "Published faster than RELAY_PUBLISH_RATE / RELAY_PUBLISH_BURST allow.",
      reconnect: true,
    },
    {
      code: 4030,
      name: "Too many connections",
      meaning: "This token's user already holds RELAY_USER_MAX_CONNECTIONS sockets on the pod.",
      reconnect: true,
    },
    {
      code: 4500,
      name: "Bad group name",
      meaning: "The path does not name a valid group: 1-99 letters, digits, '-', '_' or '.'. Fix the name.",
      reconnect: false,
    },
    {
      code: 4501,
      name: "Unauthorized",
      meaning: "The pod requires a token and none was given, or it failed verification.",
      reconnect: false,
    },
    {
      code: 4503,
      name: "Forbidden",
      meaning: "The token does not allow this group.",
      reconnect: false,
    },
  ];
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 30000;
  const MAX_ROWS = 500; // the log keeps the newest rows only, so a busy group cannot eat the tab's memory

  const $ = (id) => document.getElementById(id);
  const el = {
    connectForm: $("connect-form"),
    group: $("group"),
    token: $("token"),
    autoReconnect: $("auto-reconnect"),
    connect: $("connect"),
    disconnect: $("disconnect"),
    status: $("status"),
    channelId: $("channel-id"),
    socketPod: $("socket-pod"),
    lastClose: $("last-close"),
    publishForm: $("publish-form"),
    publishGroup: $("publish-group"),
    publishBody: $("publish-body"),
    publishError: $("publish-error"),
    publish: $("publish"),
    directForm: $("direct-form"),
    directChannel: $("direct-channel"),
    directBody: $("direct-body"),
    directError: $("direct-error"),
    directSelf: $("direct-self"),
    direct: $("direct"),
    frames: $("frames"),
    frameCount: $("frame-count"),
    clear: $("clear"),
    codes: document.querySelector("#close-codes tbody"),
  };

  const state = {
    ws: null, // the current socket, or null
    wanted: false, // the user asked to be connected (reconnects happen only while this is true)
    attempt: 0, // reconnects since the last welcome frame: the backoff exponent
    timer: 0, // the pending reconnect
    ticker: 0, // the countdown shown while waiting to reconnect
    channelId: "",
    received: 0,
  };

  function describe(code) {
    const known = CLOSE_CODES.find((row) => row.code === code);
    if (known) return known;
    if (code >= 4500 && code <= 4999) {
      return { code, name: "Refused", meaning: "The relay refused this connection; retrying as-is fails the same way.", reconnect: false };
    }
    if (code >= 4000 && code <= 4499) {
      return { code, name: "Closed by the relay", meaning: "An application close; reconnecting is fine.", reconnect: true };
    }
    return { code, name: "Unknown code", meaning: "Not a code the relay sends.", reconnect: true };
  }

  function socketUrl(group, token) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    return `${scheme}//${location.host}/${encodeURIComponent(group)}${query}`;
  }

  function shownUrl(url) {
    return url.replace(/([?&]token=)[^&]*/, "$1…"); // never print the token
  }

  function clock(date) {
    const two = (n) => String(n).padStart(2, "0");
    return `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}.${String(date.getMilliseconds()).padStart(3, "0")}`;
  }

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    el.status.textContent = text;
    const open = state.ws !== null && state.ws.readyState === WebSocket.OPEN;
    el.publish.disabled = !open;
    el.direct.disabled = !open;
    el.directSelf.disabled = !state.channelId;
    el.disconnect.disabled = !state.wanted && state.ws === null;
  }

  function logRow(kind, text) {
    const now = new Date();
    const row = document.createElement("li");
    row.className = `frame frame-${kind}`;
    row.dataset.kind = kind;
    const time = document.createElement("time");
    time.dateTime = now.toISOString();
    time.textContent = clock(now);
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = { in: "received", out: "sent", event: "event" }[kind];
    const body = document.createElement("pre");
    body.textContent = text;
    row.append(time, tag, body);
    el.frames.prepend(row);
    while (el.frames.childElementCount > MAX_ROWS) el.frames.lastElementChild.remove();
  }

  function countReceived() {
    el.frameCount.textContent = `${state.received} received`;
  }

  function clearTimers() {
    clearTimeout(state.timer);
    clearInterval(state.ticker);
    state.timer = 0;
    state.ticker = 0;
  }

  function forgetChannel() {
    state.channelId = "";
    el.channelId.value = "";
    el.socketPod.textContent = "–";
  }

  function open() {
    clearTimers();
    const group = el.group.value.trim();
    const url = socketUrl(group, el.token.value);
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      state.wanted = false;
      setStatus("stopped", `Cannot open ${shownUrl(url)}: ${err.message}`);
      return;
    }
    state.ws = ws;
    let welcomed = false;
    setStatus("connecting", `Connecting to ${shownUrl(url)} …`);

    ws.onopen = () => {
      if (ws !== state.ws) return;
      logRow("event", `open ${shownUrl(url)}`);
      setStatus("connecting", `Open; waiting for the channel id …`);
    };

    ws.onmessage = (event) => {
      if (ws !== state.ws) return;
      const text = typeof event.data === "string" ? event.data : `(binary frame, ${event.data.size ?? event.data.byteLength} bytes)`;
      state.received += 1;
      countReceived();
      logRow("in", text);
      if (welcomed) return;
      welcomed = true; // only the first frame of a socket is the relay's welcome
      let channelId = "";
      try {
        channelId = JSON.parse(text)?.message?.channel_id ?? "";
      } catch {
        channelId = "";
      }
      if (typeof channelId !== "string" || !channelId) return;
      state.channelId = channelId;
      state.attempt = 0; // a welcome means the pod took us: the next drop starts the backoff afresh
      el.channelId.value = channelId;
      el.socketPod.textContent = channelId.split(".")[0];
      if (!el.publishGroup.value.trim()) el.publishGroup.value = group;
      setStatus("open", `Connected to group ${group || "(none)"}.`);
    };

    ws.onclose = (event) => {
      if (ws !== state.ws) return; // a socket we already replaced or let go
      state.ws = null;
      forgetChannel();
      const info = describe(event.code);
      const reason = event.reason ? ` The server said: "${event.reason}".` : "";
      el.lastClose.textContent = `${event.code} ${info.name}: ${info.meaning}${reason}`;
      el.lastClose.dataset.code = String(event.code);
      logRow("event", `closed ${event.code} ${info.name}${event.reason ? ` (${event.reason})` : ""}`);
      if (!state.wanted) {
        setStatus("idle", "Disconnected.");
      } else if (!info.reconnect) {
        state.wanted = false;
        setStatus("stopped", `Closed with ${event.code} (${info.name}); not reconnecting: ${info.meaning}`);
      } else if (!el.autoReconnect.checked) {
        state.wanted = false;
        setStatus("stopped", `Closed with ${event.code} (${info.name}); automatic reconnect is off.`);
      } else {
        scheduleReconnect(event.code, info);
      }
    };
  }

  function scheduleReconnect(code, info) {
    // Exponential backoff with jitter: the ceiling doubles per attempt up to 30 s; the delay is
    // drawn from its upper half, so a pod's clients never all come back at the same instant.
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    state.attempt += 1;
    const due = Date.now() + delay;
    const show = () => {
      const left = Math.max(0, (due - Date.now()) / 1000).toFixed(1);
      setStatus("waiting", `Closed with ${code} (${info.name}); reconnecting in ${left} s (attempt ${state.attempt}).`);
    };
    show();
    state.ticker = setInterval(show, 100);
    state.timer = setTimeout(open, delay);
  }

  function letGo() {
    // Drop the current socket without reacting to its close event.
    const ws = state.ws;
    state.ws = null;
    forgetChannel();
    if (ws !== null && ws.readyState <= WebSocket.OPEN) ws.close(1000, "closed from the console");
  }

  function connect() {
    if (state.ws !== null) logRow("event", "switching group: closing the current socket");
    letGo();
    state.wanted = true;
    state.attempt = 0;
    open();
  }

  function disconnect() {
    state.wanted = false;
    clearTimers();
    if (state.ws !== null) {
      logRow("event", "closing (1000) from the console");
      letGo();
    }
    setStatus("idle", "Disconnected.");
  }

  function fields(textarea, errorBox, reserved) {
    errorBox.hidden = true;
    const raw = textarea.value.trim() || "{}";
    let value;
    try {
      value = JSON.parse(raw);
    } catch (err) {
      return fail(errorBox, `Not valid JSON: ${err.message}`);
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      return fail(errorBox, 'The fields must be a JSON object, like {"text": "hello"}.');
    }
    for (const key of reserved) {
      if (Object.hasOwn(value, key)) return fail(errorBox, `Leave "${key}" out: the form sets it.`);
    }
    return value;
  }

  function fail(errorBox, message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    return null;
  }

  function send(body) {
    if (state.ws === null || state.ws.readyState !== WebSocket.OPEN) return;
    const text = JSON.stringify(body);
    state.ws.send(text);
    logRow("out", text);
  }

  function publish() {
    const extra = fields(el.publishBody, el.publishError, ["task", "group_name"]);
    if (extra === null) return;
    const group = el.publishGroup.value.trim() || el.group.value.trim();
    if (!group) {
      fail(el.publishError, "Name the group to publish to.");
      return;
    }
    send({ task: "send_message_to_group", group_name: group, ...extra });
  }

  function directSend() {
    const extra = fields(el.directBody, el.directError, ["task", "channel_id"]);
    if (extra === null) return;
    const channelId = el.directChannel.value.trim();
    if (!channelId) {
      fail(el.directError, "Paste a channel id (a connection's own id, shown when it connects).");
      return;
    }
    send({ task: "send_message_to_channel", channel_id: channelId, ...extra });
  }

  function submitOnCtrlEnter(textarea, form) {
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
  }

  function fillCodeTable() {
    for (const row of CLOSE_CODES) {
      const tr = document.createElement("tr");
      const code = document.createElement("td");
      code.className = "mono";
      code.textContent = String(row.code);
      const meaning = document.createElement("td");
      const name = document.createElement("strong");
      name.textContent = row.name;
      meaning.append(name, ` ${row.meaning}`);
      const again = document.createElement("td");
      again.textContent = row.reconnect ? "yes" : "no";
      tr.append(code, meaning, again);
      el.codes.append(tr);
    }
    const ranges = [
      ["4000-4499", "Application close: other relay reasons.", "yes"],
      ["4500-4999", "Application refusal: retrying as-is fails the same way.", "no"],
    ];
    for (const [codes, meaning, again] of ranges) {
      const tr = document.createElement("tr");
      for (const [i, text] of [codes, meaning, again].entries()) {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 0) td.className = "mono";
        tr.append(td);
      }
      el.codes.append(tr);
    }
  }

  el.connectForm.addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  el.disconnect.addEventListener("click", disconnect);
  el.publishForm.addEventListener("submit", (event) => {
    event.preventDefault();
    publish();
  });
  el.directForm.addEventListener("submit", (event) => {
    event.preventDefault();
    directSend();
  });
  el.directSelf.addEventListener("click", () => {
    el.directChannel.value = state.channelId;
  });
  el.channelId.addEventListener("focus", () => el.channelId.select());
  el.clear.addEventListener("click", () => {
    el.frames.replaceChildren();
    state.received = 0;
    countReceived();
  });
  submitOnCtrlEnter(el.publishBody, el.publishForm);
  submitOnCtrlEnter(el.directBody, el.directForm);
  fillCodeTable();
  setStatus("idle", "Not connected.");
})();
