/* The waiting room: join (solving the proof of work when asked), then poll /queue/status no
   sooner than the room's poll_after_seconds, and go on to /beli when admitted. */
"use strict";
(function () {
  const M = window.Meterai;
  const $ = (id) => document.getElementById(id);
  const FIRST = "meterai.first";     // the first position this tab saw (for the progress bar)
  const MIN_POLL_SECONDS = 1;        // never faster, whatever an answer says
  const DEFAULT_POLL_SECONDS = 5;    // when an answer says nothing usable
  const MAX_DIFFICULTY = 32;         // beyond this a proof would take a phone far too long
  const ADMITTED_PAUSE_MS = 3000;    // time to read "it's your turn" before moving on

  let phase = "connecting";          // connecting | preparing | status | expired | fatal
  let status = null;                 // the last TicketStatus
  let notice = null;                 // {key, seconds, problem}: why the next try is delayed
  let fatal = null;                  // a problem we cannot get past by waiting
  let failures = 0;
  let first = null;
  let updated = null;
  let opensAt = null;                // performance.now() at which the sale opens (prequeue)
  let timer = null;
  let ticking = null;
  let announced = "";

  function later(seconds, next) {
    clearTimeout(timer);
    timer = setTimeout(next, Math.max(0, seconds) * 1000);
  }
  function backoff() {
    failures += 1;
    const base = Math.min(60, 2 ** Math.min(failures, 6));
    return Math.max(2, Math.round(base * (0.8 + Math.random() * 0.4)));
  }

  // --- talking to the room -------------------------------------------------------------

  async function join(proof, attempt) {
    const answer = await M.call("POST", "/queue/join", { headers: proof ? { "X-Queue-Proof": proof } : {} });
    if (answer.ok) {
      forgetFirst();  // a new place: the progress starts again from here
      return showStatus(answer.body);
    }
    if (answer.status === 428 && answer.problem.code === "pow_required" && attempt < 3) {
      return prove(answer.problem, attempt + 1);
    }
    onProblem(answer, () => join(null, 0));
  }

  // Also the first call: a refresh or a second tab finds its ticket (cookie) and keeps its place.
  async function poll() {
    const answer = await M.call("GET", "/queue/status");
    if (answer.ok) { return showStatus(answer.body); }
    if (answer.problem.code === "no_ticket") { return join(null, 0); }
    if (answer.problem.code === "ticket_expired" || answer.status === 410) {
      phase = "expired";
      render();
      $("rejoin").focus();
      return;
    }
    onProblem(answer, poll);
  }

  function showStatus(body) {
    if (body.state === "expired") {  // the room may say so in a status too
      phase = "expired";
      render();
      $("rejoin").focus();
      return;
    }
    status = body;
    phase = "status";
    notice = null;
    failures = 0;
    updated = new Date();
    if (body.state === "prequeue" && typeof body.opens_in_seconds === "number") {
      opensAt = performance.now() + body.opens_in_seconds * 1000;
    } else {
      opensAt = null;
    }
    trackFirst(body);
    render();
    if (body.state === "admitted") {
      $("continue").focus();
      setTimeout(() => location.assign(M.localUrl("/beli")), ADMITTED_PAUSE_MS);
      return;
    }
    const wait = Number(body.poll_after_seconds);
    later(Number.isFinite(wait) ? Math.max(MIN_POLL_SECONDS, wait) : DEFAULT_POLL_SECONDS, poll);
  }

  function onProblem(answer, retry) {
    const problem = answer.problem || {};
    let key;
    let seconds;
    if (answer.status === 429) { key = "retry_limited"; seconds = answer.retryAfter || backoff(); }
    else if (answer.status === 0) { key = "retry_offline"; seconds = backoff(); }
    else if (answer.status >= 500) { key = "retry_busy"; seconds = answer.retryAfter || backoff(); }
    else { key = "retry_problem"; seconds = answer.retryAfter || backoff(); }
    notice = { key: key, seconds: seconds, problem: problem };
    render();
    later(seconds, retry);
  }

  // --- proof of work: SHA-256("<challenge>:<nonce>") with `difficulty` leading zero bits ------

  function zeroBits(bytes) {
    let bits = 0;
    for (const byte of bytes) {
      if (byte === 0) { bits += 8; continue; }
      return bits + Math.clz32(byte) - 24;
    }
    return bits;
  }

  async function solve(challenge, difficulty) {
    const encoder = new TextEncoder();
    const batch = 256;  // digests in flight at once: Web Crypto works off the main thread
    for (let start = 0; ; start += batch) {
      const nonces = Array.from({ length: batch }, (_, i) => start + i);
      const digests = await Promise.all(nonces.map(
        (nonce) => crypto.subtle.digest("SHA-256", encoder.encode(challenge + ":" + nonce))));
      for (let i = 0; i < batch; i += 1) {
        if (zeroBits(new Uint8Array(digests[i])) >= difficulty) { return challenge + ":" + nonces[i]; }
      }
    }
  }

  async function prove(problem, attempt) {
    const difficulty = Number(problem.difficulty);
    if (!(window.crypto && crypto.subtle) || typeof problem.challenge !== "string"
        || !(difficulty >= 0 && difficulty <= MAX_DIFFICULTY)) {
      phase = "fatal";
      fatal = { code: "nocrypto" };
      return render();
    }
    phase = "preparing";
    render();
    const proof = await solve(problem.challenge, difficulty);
    phase = "connecting";
    return join(proof, attempt);
  }

  // --- showing it ------------------------------------------------------------------------

  // Kept per tab (sessionStorage): a reload keeps the bar where it was, a new tab starts afresh.
  function trackFirst(body) {
    if (body.state !== "waiting" && body.state !== "paused") { return; }
    if (first === null) {
      try { first = Number(sessionStorage.getItem(FIRST)) || null; } catch (error) { first = null; }
    }
    if (first === null || first < body.position) { first = body.position; }
    try { sessionStorage.setItem(FIRST, String(first)); } catch (error) { /* not kept */ }
  }
  function forgetFirst() {
    first = null;
    try { sessionStorage.removeItem(FIRST); } catch (error) { /* not kept */ }
  }

  function countdownText() {
    const left = Math.max(0, Math.round((opensAt - performance.now()) / 1000));
    const h = Math.floor(left / 3600);
    const m = Math.floor((left % 3600) / 60);
    const s = String(left % 60).padStart(2, "0");
    return h > 0 ? h + ":" + String(m).padStart(2, "0") + ":" + s : m + ":" + s;
  }

  function show(id, visible) { $(id).hidden = !visible; }

  function render() {
    const state = phase === "status" ? status.state : phase;
    const titles = {
      connecting: "connecting", preparing: "preparing", prequeue: "prequeue_title",
      waiting: "waiting_title", paused: "paused_title", admitted: "admitted_title",
      expired: "expired_title", fatal: "room_title",
    };
    $("state-title").textContent = M.t(titles[state] || "waiting_title");
    const queued = phase === "status" && (state === "waiting" || state === "paused");

    // The position is announced (a live region) only when its wording changes; the state's
    // note below is a live region too, so "paused", "your turn" and "expired" are heard.
    const summary = !queued ? "" : M.t(status.position === 1 ? "people_ahead_one" : "people_ahead",
      { n: M.number(status.position) });
    if (summary !== announced) { $("summary").textContent = summary; announced = summary; }
    show("summary", queued);

    show("figures", queued);
    show("progress-box", queued);
    if (queued) {
      $("eta").textContent = state === "paused" ? M.t("eta_unknown") : M.duration(status.eta_seconds);
      const percent = first ? Math.round(100 * (first - status.position) / first) : 0;
      $("progress").value = percent;
      $("progress").textContent = percent + "%";
      $("progress-text").textContent = M.t("progress_value", { p: percent });
    }

    show("countdown", state === "prequeue" && opensAt !== null);
    clearInterval(ticking);
    if (state === "prequeue" && opensAt !== null) {
      const tick = () => { $("countdown").textContent = M.t("prequeue_countdown", { time: countdownText() }); };
      tick();
      ticking = setInterval(tick, 1000);
    }

    const notes = {
      preparing: "preparing_note", prequeue: "prequeue_note", paused: "paused_note",
      admitted: "admitted_note", expired: "expired_note",
    };
    $("note").textContent = notes[state] ? M.t(notes[state]) : "";
    $("note").className = state === "paused" ? "notice" : "";

    let message = "";
    if (phase === "fatal") { message = M.problemText(fatal); }
    else if (notice) {
      message = M.t(notice.key, { s: notice.seconds, problem: M.problemText(notice.problem) });
    }
    $("notice").textContent = message;
    show("notice", message !== "");

    $("continue").href = M.localUrl("/beli");
    show("continue", state === "admitted");
    show("rejoin", state === "expired");
    if (updated) {
      $("updated").textContent = updated.toLocaleTimeString(M.t("locale"));
      $("updated").dateTime = updated.toISOString();
    }
  }

  $("rejoin").addEventListener("click", () => {
    phase = "connecting";
    render();
    join(null, 0);
  });
  M.onLanguage(() => { announced = ""; render(); });
  render();
  poll();
})();
