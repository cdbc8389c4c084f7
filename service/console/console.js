// relay console: a protocol v1 WebSocket client in plain JavaScript (no build step, no dependencies).
//
// It opens ws(s)://<this host>/ offering the subprotocol "relay.v1"; the first frame is the welcome
// {"message": {"channel_id": C}}. Then it joins the chosen group: {"task": "join", "group_name": G,
// "ref": R}, plus "since": {"epoch": E, "offset": N} when it has seen the group before, so that a
// group that keeps history sends what was missed while away (docs/history.md). Deliveries are
// {"group": G, "epoch": E, "offset": N, "message": {...}} (no position without history); direct
// sends are {"message": {...}}; requests are answered {"ack": R, ...} or {"error": {..., "ref": R}}.
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
      code: 4010,
      name: "Disconnected",
      meaning: "A backend disconnected this user or socket through the server API; reconnecting is fine.",
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
    {
      code: 4510,
      name: "Revoked",
      meaning: "A backend cut this user off (server API): a token issued before that is refused for a while.",
      reconnect: false,
    },
  ];
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 30000;
  const MAX_ROWS = 500; // the log keeps the newest rows only, so a busy group cannot eat the tab's memory
  const SUBPROTOCOL = "relay.v1";
  // Join errors worth another try after a backoff; any other one fails the same way again.
  const TRANSIENT_ERRORS = new Set(["broker_unavailable", "rate_limited"]);
  // Why a join with "since" could not recover (the ack's "reason").
  const MISSED_BECAUSE = {
    trimmed: "the group's history no longer holds them all",
    epoch_changed: "the group's history was lost (it expired, or Redis restarted empty)",
    unavailable: "the group's history could not be read",
  };

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
    position: $("position"),
    lastClose: $("last-close"),
    presence: $("presence"),
    presenceAsk: $("presence-ask"),
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
    group: "", // the group the user asked for; every socket joins it
    attempt: 0, // reconnects since the last acknowledged join: the backoff exponent
    timer: 0, // the pending reconnect
    ticker: 0, // the countdown shown while waiting to reconnect
    channelId: "",
    received: 0,
    lastRef: 0,
    pending: new Map(), // ref -> what the current socket asked for: { kind: "join" | "publish" | "direct", ... }
    // Per group this page has joined: `since`, the position to rejoin from (null: the group keeps no
    // history); `shown`, the last delivery shown (a repeat of it or of anything before is dropped);
    // `recoverUpTo`, the last offset a recovering join said was coming from history.
    groups: new Map(),
    presenceShown: false, // the user asked once: presence events of the group ask again
    presenceTimer: 0,
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

  function socketUrl(token) {
    // Always the root: the page joins its group with a join frame, so that it can say where it was.
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    return `${scheme}//${location.host}/${query}`;
  }

  function shownUrl(url) {
    return url.replace(/([?&]token=)[^&]*/, "$1…"); // never print the token
  }

  function clock(date) {
    const two = (n) => String(n).padStart(2, "0");
    return `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}.${String(date.getMilliseconds()).padStart(3, "0")}`;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    el.status.textContent = text;
    const open = state.ws !== null && state.ws.readyState === WebSocket.OPEN;
    el.publish.disabled = !open;
    el.direct.disabled = !open;
    el.directSelf.disabled = !state.channelId;
    el.presenceAsk.disabled = !open;
    el.disconnect.disabled = !state.wanted && state.ws === null;
  }

  // One row of the frame log. `options.tag` replaces the kind's label; `options.offset` is a
  // delivery's position in its group, shown as #N.
  function logRow(kind, text, options = {}) {
    const now = new Date();
    const row = document.createElement("li");
    row.className = `frame frame-${kind}`;
    row.dataset.kind = kind;
    const time = document.createElement("time");
    time.dateTime = now.toISOString();
    time.textContent = clock(now);
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = options.tag ?? { in: "received", out: "sent", event: "event" }[kind];
    if (options.offset !== undefined) {
      row.dataset.offset = String(options.offset);
      const offset = document.createElement("span");
      offset.className = "offset";
      offset.title = `offset ${options.offset} in the group's epoch ${options.epoch}`;
      offset.textContent = `#${options.offset}`;
      tag.append(offset);
    }
    const body = document.createElement("pre");
    body.textContent = text;
    row.append(time, tag, body);
    el.frames.prepend(row);
    while (el.frames.childElementCount > MAX_ROWS) el.frames.lastElementChild.remove();
  }

  function countReceived() {
    el.frameCount.textContent = `${state.received} received`;
  }

  function showPosition() {
    const known = state.groups.get(state.group);
    if (known === undefined) el.position.textContent = "–";
    else if (known.since === null) el.position.textContent = "none: this group keeps no history";
    else el.position.textContent = `#${known.since.offset} · epoch ${known.since.epoch}`;
  }

  function clearTimers() {
    clearTimeout(state.timer);
    clearInterval(state.ticker);
    state.timer = 0;
    state.ticker = 0;
  }

  function forgetChannel() {
    state.channelId = "";
    state.pending.clear(); // refs belong to one socket: their answers died with it
    el.channelId.value = "";
    el.socketPod.textContent = "–";
  }

  function open() {
    clearTimers();
    const url = socketUrl(el.token.value);
    let ws;
    try {
      ws = new WebSocket(url, [SUBPROTOCOL]);
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
      logRow("event", `open ${shownUrl(url)} (${ws.protocol || "no subprotocol"})`);
      setStatus("connecting", "Open; waiting for the channel id …");
    };

    ws.onmessage = (event) => {
      if (ws !== state.ws) return;
      state.received += 1;
      countReceived();
      if (typeof event.data !== "string") {
        logRow("in", `(binary frame, ${event.data.size ?? event.data.byteLength} bytes)`);
        return;
      }
      let frame = null;
      try {
        frame = JSON.parse(event.data);
      } catch {
        frame = null;
      }
      if (frame === null || typeof frame !== "object") {
        logRow("in", event.data);
      } else if (!welcomed) {
        welcomed = true; // only the first frame of a socket is the relay's welcome
        logRow("in", event.data);
        welcome(frame);
      } else if ("ack" in frame) {
        logRow("in", event.data);
        acknowledged(frame);
      } else if ("error" in frame) {
        logRow("in", event.data);
        refused(frame.error);
      } else if ("presence" in frame && "group" in frame) {
        logRow("event", presenceEvent(frame.presence, frame.group));
      } else {
        deliver(frame, event.data);
      }
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
      const closed = `Closed with ${event.code} (${info.name})`;
      if (!state.wanted) {
        setStatus("idle", "Disconnected.");
      } else if (!info.reconnect) {
        state.wanted = false;
        setStatus("stopped", `${closed}; not reconnecting: ${info.meaning}`);
      } else {
        reconnectLater(closed);
      }
    };
  }

  function welcome(frame) {
    const channelId = frame?.message?.channel_id;
    if (typeof channelId !== "string" || !channelId) return;
    state.channelId = channelId;
    el.channelId.value = channelId;
    el.socketPod.textContent = channelId.split(".")[0];
    join();
  }

  function join() {
    const group = state.group;
    const since = state.groups.get(group)?.since ?? null;
    const body = { task: "join", group_name: group, ref: nextRef() };
    if (since !== null) body.since = since; // a group seen before: ask for what was missed
    state.pending.set(body.ref, { kind: "join", group, since });
    send(body);
    setStatus("connecting", since ? `Rejoining group ${group} after #${since.offset} …` : `Joining group ${group} …`);
  }

  function acknowledged(ack) {
    const request = state.pending.get(ack.ack);
    state.pending.delete(ack.ack);
    if (request?.kind === "join") joined(request, ack);
    else if (request?.kind === "presence") showPresence(ack.presence);
  }

  // Presence (docs/presence.md): asked on request only, so a group without a presence rule costs no
  // frame; once shown, the group's join and leave events ask again (at most every half second).
  function askPresence() {
    state.presenceShown = true;
    clearTimeout(state.presenceTimer);
    state.presenceTimer = 0;
    if (state.ws === null || !state.group) return;
    request("presence", { task: "presence", group_name: state.group });
  }

  function showPresence(presence) {
    if (!presence || typeof presence !== "object") return;
    const counts = `${plural(presence.connections, "connection")}, ${plural(presence.users, "user")}`;
    if (!Array.isArray(presence.members)) {
      el.presence.textContent = counts;
      return;
    }
    const names = presence.members.map((m) => {
      const name = typeof m.claims?.name === "string" ? ` "${m.claims.name}"` : "";
      return `${m.user}${name}${m.connections > 1 ? ` ×${m.connections}` : ""}`;
    });
    el.presence.textContent = `${counts}: ${names.join(", ")}${presence.truncated ? ", …" : ""}`;
  }

  function presenceEvent(event, group) {
    if (state.presenceShown && group === state.group && state.presenceTimer === 0) {
      state.presenceTimer = setTimeout(askPresence, 500);
    }
    return `${event?.user} ${event?.event === "join" ? "joined" : "left"} ${group}`;
  }

  // A join took effect. Its ack comes before any message of the group and, for a group that keeps
  // history, carries the group's last position; for a join with `since`, whether what was missed follows.
  function joined({ group, since }, ack) {
    state.attempt = 0; // the pod took us: the next drop starts the backoff afresh
    if (!el.publishGroup.value.trim()) el.publishGroup.value = group;
    const before = state.groups.get(group);
    const known = before ?? { since: null, shown: null, recoverUpTo: 0 };
    state.groups.set(group, known);
    const position = typeof ack.epoch === "string" ? { epoch: ack.epoch, offset: ack.offset } : null;
    known.recoverUpTo = 0;
    if (position === null) {
      known.since = null;
      if (before !== undefined) {
        logRow("event", `rejoined ${group}: it keeps no history, so what was published meanwhile is lost here`);
      }
      setStatus("open", `Connected to group ${group}.`);
    } else if (since === null) {
      known.since = position;
      setStatus("open", `Connected to group ${group}.`);
    } else if (ack.recovered) {
      // The missed messages, since.offset + 1 up to the ack's offset, follow in order, then live ones.
      const count = position.offset - since.offset;
      known.recoverUpTo = position.offset;
      const range = count > 0 ? ` (#${since.offset + 1} to #${position.offset})` : "";
      logRow("event", `rejoined ${group} after #${since.offset}: recovered ${plural(count, "missed message")}${range}`);
      setStatus("open", `Connected to group ${group}; recovered ${plural(count, "missed message")}.`);
    } else {
      known.since = position; // none of the missed range will come: carry on from the group's position
      const reason = ack.reason ?? "no reason given";
      const why = MISSED_BECAUSE[reason] ?? "the relay could not send them";
      const missed = `messages were missed (${reason}): ${why}`;
      logRow("event", `rejoined ${group} after #${since.offset}: ${missed}; the group is at #${position.offset}`);
      setStatus("gap", `Connected to group ${group}, but ${missed}. Reload the page to start afresh.`);
    }
    showPosition();
  }

  function refused(error) {
    const request = state.pending.get(error?.ref);
    state.pending.delete(error?.ref);
    const why = `${error?.code}: ${error?.detail}`;
    if (request?.kind === "publish") fail(el.publishError, `The relay refused it (${why}).`);
    else if (request?.kind === "direct") fail(el.directError, `The relay refused it (${why}).`);
    else if (request?.kind === "join") joinRefused(request.group, error?.code, why);
    else if (request?.kind === "presence") {
      el.presence.textContent =
        error?.code === "presence_off" ? "not kept for this group (no presence rule)" : `unavailable (${why})`;
    }
  }

  function joinRefused(group, code, why) {
    const failed = `Joining group ${group || "(empty)"} failed (${why})`;
    letGo();
    if (TRANSIENT_ERRORS.has(code)) {
      reconnectLater(failed);
    } else {
      state.wanted = false;
      setStatus("stopped", `${failed}; not reconnecting.`);
    }
  }

  function deliver(frame, text) {
    const { group, epoch, offset } = frame;
    if (typeof epoch !== "string" || typeof offset !== "number") {
      logRow("in", text); // a direct send, or a message of a group that keeps no history
      return;
    }
    const known = state.groups.get(group);
    if (known === undefined) {
      logRow("in", text, { offset, epoch }); // not a group this page joined: nothing to track
      return;
    }
    const shown = known.shown;
    if (shown !== null && shown.epoch === epoch && offset <= shown.offset) {
      logRow("event", `dropped a repeat of ${group} #${offset}: already shown`);
      return;
    }
    const fromHistory = known.since?.epoch === epoch && offset <= known.recoverUpTo;
    known.shown = { epoch, offset };
    known.since = { epoch, offset };
    logRow("in", text, { offset, epoch, tag: fromHistory ? "recovered" : "received" });
    if (group === state.group) showPosition();
  }

  function reconnectLater(why) {
    if (!el.autoReconnect.checked) {
      state.wanted = false;
      setStatus("stopped", `${why}; automatic reconnect is off.`);
      return;
    }
    // Exponential backoff with jitter: the ceiling doubles per attempt up to 30 s; the delay is
    // drawn from its upper half, so a pod's clients never all come back at the same instant.
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    state.attempt += 1;
    const due = Date.now() + delay;
    const show = () => {
      const left = Math.max(0, (due - Date.now()) / 1000).toFixed(1);
      setStatus("waiting", `${why}; reconnecting in ${left} s (attempt ${state.attempt}).`);
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
    state.group = el.group.value.trim();
    state.attempt = 0;
    showPosition();
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

  function nextRef() {
    state.lastRef += 1;
    return state.lastRef;
  }

  function send(body) {
    if (state.ws === null || state.ws.readyState !== WebSocket.OPEN) return;
    const text = JSON.stringify(body);
    state.ws.send(text);
    logRow("out", text);
  }

  // A publish or direct send with a ref of its own, so an error can be shown beside its form.
  function request(kind, body) {
    const ref = nextRef();
    state.pending.set(ref, { kind });
    send({ ...body, ref });
  }

  function publish() {
    const extra = fields(el.publishBody, el.publishError, ["task", "group_name", "ref"]);
    if (extra === null) return;
    const group = el.publishGroup.value.trim() || state.group || el.group.value.trim();
    if (!group) {
      fail(el.publishError, "Name the group to publish to.");
      return;
    }
    request("publish", { task: "send_message_to_group", group_name: group, ...extra });
  }

  function directSend() {
    const extra = fields(el.directBody, el.directError, ["task", "channel_id", "ref"]);
    if (extra === null) return;
    const channelId = el.directChannel.value.trim();
    if (!channelId) {
      fail(el.directError, "Paste a channel id (a connection's own id, shown when it connects).");
      return;
    }
    request("direct", { task: "send_message_to_channel", channel_id: channelId, ...extra });
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
  el.presenceAsk.addEventListener("click", askPresence);
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
