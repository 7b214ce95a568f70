/*
 * pgws-relay live console.
 *
 * Owns: the subscriptions this page opens to the relay that served it (one per channel typed,
 * or one to /TOKEN), over WebSocket or Server-Sent Events, the bounded list of received
 * messages, the message rate, and sending. Connecting, reconnecting with jittered backoff,
 * resuming from the last position, dropping duplicates and refreshing the token are the
 * JavaScript client library's (pgws-relay-client.js, a copy of clients/js/index.js that a test
 * keeps identical): the page shows what it reports. It decodes the token's payload for display
 * only: it never verifies a token and never sees the secret. Message text only ever reaches
 * the page as textContent, never as markup.
 *
 * An ES2022 module, no build step: this file is served as is.
 */
import { Closed, Refused, subscribe } from "./pgws-relay-client.js";

var MAX_KEPT = 500;              // messages kept on the page; older ones are dropped
var RATE_WINDOW_MS = 5000;       // the rate is messages per second over this window
var RATE_BUCKET_MS = 250;
var RENDER_DELAY_MS = 50;        // messages are drawn in batches, not one by one

// What a close code means, for the connections table (RFC 6455 and docs/protocol.md).
var CLOSE_MEANING = {
  1000: "closed normally",
  1001: "relay shutting down",
  1006: "no close frame: relay unreachable",
  1008: "policy violation (rate or inbound budget exceeded)",
  1009: "message too big",
  1011: "relay error",
  1013: "slow consumer (try again later)",
  3001: "JWT expired"
};

// Characters a browser sends unchanged in a URL path. The relay takes the channel from the
// raw path, without percent-decoding, so a name with any other character (space, %, /, ?,
// #, non-ASCII) would reach it escaped, as a different name: such channels need the
// token's channels claim and an empty channel field.
var PATH_SAFE = /^[A-Za-z0-9!$&'()*+,\-.:;=@[\]^_|~]+$/;
var TOKEN_SHAPE = /^[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$/;

function $(id) { return document.getElementById(id); }

// ---------------------------------------------------------------- token (display only)

/** The token's payload as an object, or null when it cannot be read. Not verified. */
function decodePayload(token) {
  if (!TOKEN_SHAPE.test(token)) { return null; }
  try {
    var b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) { b64 += "="; }
    var binary = atob(b64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) { bytes[i] = binary.charCodeAt(i); }
    var claims = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    return claims && typeof claims === "object" && !Array.isArray(claims) ? claims : null;
  } catch (e) {
    return null;
  }
}

/** The channels a token allows, as the relay computes them (channel, then channels). */
function tokenChannels(claims) {
  var list = [];
  if (typeof claims.channel === "string") { list.push(claims.channel); }
  if (Array.isArray(claims.channels) &&
      claims.channels.every(function (c) { return typeof c === "string"; })) {
    claims.channels.forEach(function (c) { if (list.indexOf(c) < 0) { list.push(c); } });
  }
  return list;
}

function canWrite(claims) { return !!claims && (claims.mode === "w" || claims.mode === "rw"); }

function isExpired(claims) {
  return !!claims && typeof claims.exp === "number" && claims.exp * 1000 <= Date.now();
}

function relative(ms) {
  var s = Math.round(Math.abs(ms) / 1000);
  var text = s < 120 ? s + " s" : s < 7200 ? Math.round(s / 60) + " min"
                                             : Math.round(s / 3600) + " h";
  return ms >= 0 ? "in " + text : text + " ago";
}

function showClaims() {
  var shown = decodePayload($("token").value.trim());
  var box = $("claims");
  box.hidden = !$("token").value.trim();
  if (!shown) {
    $("claim-mode").textContent = "(payload not readable)";
    $("claim-channels").textContent = "";
    $("claim-exp").textContent = "";
    return;
  }
  $("claim-mode").textContent = typeof shown.mode === "string" ? shown.mode : "(none)";
  var channels = tokenChannels(shown);
  $("claim-channels").textContent = channels.length ? channels.join(", ")
                                                    : "(any channel named in the URL)";
  if (typeof shown.exp === "number") {
    var ms = shown.exp * 1000 - Date.now();
    $("claim-exp").textContent = new Date(shown.exp * 1000).toLocaleString() + " (" +
      (ms > 0 ? relative(ms) : "expired " + relative(ms)) + ")";
    $("claim-exp").className = ms > 0 ? "" : "error";
  } else {
    $("claim-exp").textContent = "never";
    $("claim-exp").className = "";
  }
}

// ---------------------------------------------------------------- messages and rate

var kept = [];          // {at: Date, label, text, kind}: at most MAX_KEPT, oldest first
var pending = [];       // received but not drawn yet
var renderTimer = null;
var received = 0;
var buckets = [];       // [bucket index, count] pairs, oldest first, for the rate
var rateSince = null;   // when counting started (the rate's window is shorter before)

function record(label, text, kind, position) {
  var item = { at: new Date(), label: label, text: text, kind: kind, position: position || "" };
  pending.push(item);
  // A hidden tab runs timers rarely; never hold more than one page's worth.
  if (pending.length > 2 * MAX_KEPT) { pending.splice(0, pending.length - MAX_KEPT); }
  if (renderTimer === null) { renderTimer = setTimeout(render, RENDER_DELAY_MS); }
}

function countArrival() {
  received += 1;
  var index = Math.floor(performance.now() / RATE_BUCKET_MS);
  var last = buckets[buckets.length - 1];
  if (last && last[0] === index) { last[1] += 1; } else { buckets.push([index, 1]); }
}

function showRate() {
  var now = performance.now();
  var oldest = Math.floor((now - RATE_WINDOW_MS) / RATE_BUCKET_MS);
  while (buckets.length && buckets[0][0] <= oldest) { buckets.shift(); }
  var count = buckets.reduce(function (sum, b) { return sum + b[1]; }, 0);
  var window = rateSince === null ? RATE_WINDOW_MS
                                  : Math.min(RATE_WINDOW_MS, Math.max(now - rateSince, 1000));
  $("rate").textContent = (count * 1000 / window).toFixed(1) + " msg/s";
  $("rate").title = "messages per second over the last " + RATE_WINDOW_MS / 1000 + " s";
}

function showCount() {
  $("count").textContent = received + " received, " + kept.length + " shown (max " +
    MAX_KEPT + ")";
}

function pad(n, width) { return String(n).padStart(width, "0"); }

function format(item) {
  if ($("pretty").checked && item.kind === "data") {
    try { return JSON.stringify(JSON.parse(item.text), null, 2); } catch (e) { /* as is */ }
  }
  return item.text;
}

function element(item) {
  var li = document.createElement("li");
  li.className = "msg " + item.kind;
  li.dataset.channel = item.label;
  var head = document.createElement("div");
  head.className = "head";
  var time = document.createElement("span");
  time.className = "time";
  time.textContent = pad(item.at.getHours(), 2) + ":" + pad(item.at.getMinutes(), 2) + ":" +
    pad(item.at.getSeconds(), 2) + "." + pad(item.at.getMilliseconds(), 3);
  var channel = document.createElement("span");
  channel.className = "channel";
  channel.textContent = item.label;
  head.append(time, channel);
  if (item.position) {
    var position = document.createElement("span");
    position.className = "position";
    position.textContent = item.position;
    position.title = "position: resume from here with ?from= or Last-Event-ID";
    head.append(position);
  }
  var body = document.createElement("pre");
  body.className = "text";
  body.textContent = format(item);   // never innerHTML: this is data
  li.append(head, body);
  return li;
}

function render() {
  renderTimer = null;
  var list = $("messages");
  var newestFirst = $("newest-first").checked;
  var atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  var batch = pending.slice(-MAX_KEPT);
  pending = [];
  var fragment = document.createDocumentFragment();
  batch.forEach(function (item) {
    kept.push(item);
    if (newestFirst) { fragment.prepend(element(item)); } else { fragment.append(element(item)); }
  });
  if (newestFirst) { list.prepend(fragment); } else { list.append(fragment); }
  while (kept.length > MAX_KEPT) {
    kept.shift();
    list.removeChild(newestFirst ? list.lastElementChild : list.firstElementChild);
  }
  if (!newestFirst && atBottom) { list.scrollTop = list.scrollHeight; }
  showCount();
}

function redraw() {
  var list = $("messages");
  list.replaceChildren();
  var items = kept.concat(pending);
  kept = [];
  pending = items.slice(-MAX_KEPT);
  render();
  if (!$("newest-first").checked) { list.scrollTop = list.scrollHeight; }
}

// ---------------------------------------------------------------- subscriptions

var links = [];
var claims = null;
var liveToken = null;   // the token the subscriptions were opened (or last refreshed) with

/** The token for a refresh or a reconnect: a fresh one pasted into the form, if any. */
function currentToken() {
  var typed = $("token").value.trim();
  return TOKEN_SHAPE.test(typed) ? typed : liveToken;
}

/** "closed 1001 (going away)" from the library, as "1001 relay shutting down". */
function describeClose(why) {
  var match = /^closed (\d{4})(?: \((.*)\))?$/.exec(why);
  if (!match) { return why; }
  var code = Number(match[1]);
  var meaning = CLOSE_MEANING[code] || "";
  var reason = match[2] || "";
  return code + (reason ? " " + reason : "") +
    (meaning && meaning !== reason ? " (" + meaning + ")" : "");
}

/** One subscription (pgws-relay-client) to the relay, shown as a row of the table. */
function Link(channel, token, transport) {
  this.channel = channel;            // null: /TOKEN, the token's own channels
  this.label = channel === null ? "(token channels)" : channel;
  this.transport = transport;
  this.state = "connecting";
  this.detail = "";
  this.reconnects = 0;               // times it was open again after a drop
  this.lastClose = "";
  this.stopped = false;
  this.row = document.createElement("tr");
  this.cells = ["channel", "state", "reconnects", "close"].map(function (name) {
    var td = document.createElement("td");
    td.className = name;
    this.row.append(td);
    return td;
  }, this);
  this.row.dataset.channel = this.label;
  $("connections").tBodies[0].append(this.row);
  var scheme = transport === "sse" ? location.protocol : (location.protocol === "https:" ? "wss:" : "ws:");
  var path = channel === null ? "/" : "/" + channel;
  this.subscription = subscribe(scheme + "//" + location.host + path, {
    token: token,
    getToken: currentToken,
    transport: transport,
    onStatus: this.status.bind(this)
  });
  this.show();
  this.read();
}

Link.prototype.show = function () {
  this.row.dataset.state = this.state;
  this.cells[0].textContent = this.label;
  this.cells[1].textContent = this.detail ? this.state + ": " + this.detail : this.state;
  this.cells[2].textContent = String(this.reconnects);
  this.cells[3].textContent = this.lastClose;
  updateSummary();
};

/** What the library tells of its connection. */
Link.prototype.status = function (status) {
  if (this.stopped) { return; }
  switch (status.state) {
    case "connecting":
      this.state = "connecting";
      this.detail = "";
      break;
    case "connected":
      this.reconnects = status.connections - 1;
      record(this.label, this.reconnects ? "reconnected (" + this.reconnects + ")" +
        (status.replayed ? ", " + status.replayed + " replayed" : "") : "connected" +
        (this.transport === "sse" ? " (Server-Sent Events)" : ""), "event");
      this.state = "open";
      this.detail = "";
      break;
    case "reconnecting":
      // The close column keeps the last close; other reasons (a refused or failed
      // handshake, a token handed over) show beside the state.
      var closed = /^closed \d{4}/.test(status.why);
      if (closed) { this.lastClose = describeClose(status.why); }
      record(this.label, closed ? "closed " + this.lastClose : status.why, "event");
      this.state = status.delay ? "waiting" : "connecting";
      this.detail = (closed ? "" : status.why + "; ") + (status.delay ? "retry in " +
        (status.delay / 1000).toFixed(1) + " s" : "at once");
      break;
    case "token":
      liveToken = currentToken();
      record(this.label, "token refreshed in place" + (status.exp ? ", expires " +
        new Date(status.exp * 1000).toLocaleString() : ""), "event");
      return;
    case "token-refused":
      record(this.label, "token refused: " + status.reason + " (the old one is kept)", "event");
      return;
    case "token-unanswered":
      record(this.label, "no answer to the token refresh: reconnecting with it", "event");
      return;
    default:
      return;
  }
  this.show();
  updateSend();
};

/** Read the subscription's events onto the page until it ends. */
Link.prototype.read = async function () {
  try {
    for await (var event of this.subscription) {
      if (this.stopped) { break; }
      if (event.type === "message") {
        countArrival();
        record(this.label, event.payload, "data", event.position);
      } else {
        record(this.label, "lost (" + event.reason + "): messages may be missing before this point",
          "event lost", event.position);
      }
    }
    this.ended(null);
  } catch (error) {
    this.ended(error);
  }
};

Link.prototype.ended = function (error) {
  if (this.stopped || error === null) {
    this.state = "closed";
    this.detail = "";
  } else if ((error instanceof Refused && error.body === "Token expired") ||
             (error instanceof Closed && error.code === 3001)) {
    // Reconnecting with this token would be refused: wait for a new one.
    this.state = "expired";
    this.detail = "paste a fresh token and connect";
    record(this.label, "ended: " + error.message, "event");
  } else {
    this.state = "failed";
    this.detail = error.message;
    record(this.label, "ended: " + error.message, "event");
  }
  this.show();
  updateSend();
};

Link.prototype.stop = function () {
  this.stopped = true;
  this.subscription.close();
  this.state = "closed";
  this.show();
};

Link.prototype.send = function (text) {
  return this.subscription.send(text);
};

function updateSummary() {
  var open = links.filter(function (l) { return l.state === "open"; }).length;
  var status = $("status");
  if (!links.length) {
    status.textContent = "not connected";
    status.dataset.state = "idle";
  } else {
    status.textContent = open + " of " + links.length + " open";
    status.dataset.state = open === links.length ? "open" : open ? "partial" : "down";
  }
  $("reconnects").textContent = String(links.reduce(function (sum, l) {
    return sum + l.reconnects;
  }, 0));
}

function updateSend() {
  var form = $("send-form");
  form.hidden = !canWrite(claims) || !links.length ||
    links.every(function (l) { return l.transport === "sse"; });
  var select = $("send-target");
  var chosen = select.value;
  select.replaceChildren();
  var all = document.createElement("option");
  all.value = "";
  all.textContent = "all open connections";
  select.append(all);
  links.forEach(function (link, index) {
    var option = document.createElement("option");
    option.value = String(index);
    option.textContent = link.label;
    select.append(option);
  });
  select.value = chosen && Number(chosen) < links.length ? chosen : "";
  $("send").disabled = !links.some(function (l) { return l.state === "open"; });
}

function disconnect() {
  links.forEach(function (link) { link.stop(); });
  links = [];
  $("connections").tBodies[0].replaceChildren();
  $("disconnect").disabled = true;
  updateSummary();
  updateSend();
}

function fail(message) {
  $("form-error").textContent = message;
  return false;
}

function connect() {
  $("form-error").textContent = "";
  if (location.protocol !== "http:" && location.protocol !== "https:") {
    return fail("Open this page from the relay (http://HOST:PORT/), not as a file.");
  }
  var token = $("token").value.trim();
  if (!TOKEN_SHAPE.test(token)) {
    return fail("That is not a JWT (three base64url parts separated by dots).");
  }
  var decoded = decodePayload(token);
  if (isExpired(decoded)) { return fail("This token has expired: paste a fresh one."); }
  var typed = $("channels").value.split(/[\s,]+/).filter(function (c) { return c; });
  var channels = typed.filter(function (c, i) { return typed.indexOf(c) === i; });
  var bad = channels.filter(function (c) { return !PATH_SAFE.test(c); });
  if (bad.length) {
    return fail("Channel " + JSON.stringify(bad[0]) + " cannot be sent as typed in a URL " +
      "path; leave the field empty and use a token whose channels claim names it.");
  }
  var allowed = decoded ? tokenChannels(decoded) : [];
  if (decoded && !channels.length && !allowed.length) {
    return fail("This token names no channel: type one (the relay would answer No " +
      "allowed channels).");
  }
  var refused = channels.filter(function (c) {
    return allowed.length && allowed.indexOf(c) < 0;
  });
  if (refused.length) {
    return fail("The token does not allow " + JSON.stringify(refused[0]) + " (it allows " +
      allowed.join(", ") + ").");
  }
  disconnect();
  claims = decoded;
  received = 0;
  buckets = [];
  rateSince = performance.now();
  liveToken = token;
  var transport = $("transport").value === "sse" ? "sse" : "websocket";
  links = (channels.length ? channels : [null]).map(function (c) {
    return new Link(c, token, transport);
  });
  $("disconnect").disabled = false;
  if (claims && claims.mode === "w") {
    record("console", "mode w: the relay sends this connection no messages", "event");
  }
  updateSend();
  return true;
}

function send() {
  var text = $("send-text").value;
  var target = $("send-target").value;
  var chosen = target === "" ? links : [links[Number(target)]];
  var sent = chosen.filter(function (link) { return link && link.send(text); });
  record("console", "sent " + new TextEncoder().encode(text).length + " bytes to " +
    (sent.length ? sent.map(function (l) { return l.label; }).join(", ") : "nobody (not open)"),
    "event");
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", function () {
  $("token").addEventListener("input", showClaims);
  $("connect-form").addEventListener("submit", function (e) { e.preventDefault(); connect(); });
  $("disconnect").addEventListener("click", disconnect);
  $("send-form").addEventListener("submit", function (e) { e.preventDefault(); send(); });
  $("send-text").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
  });
  $("newest-first").addEventListener("change", redraw);
  $("pretty").addEventListener("change", redraw);
  $("clear").addEventListener("click", function () {
    kept = [];
    pending = [];
    received = 0;
    $("messages").replaceChildren();
    showCount();
  });
  setInterval(function () { showRate(); if ($("token").value) { showClaims(); } }, 500);
  showClaims();
  showCount();
  showRate();
});
