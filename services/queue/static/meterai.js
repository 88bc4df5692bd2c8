/* Shared by the applicant's pages: the language (Bahasa Indonesia by default, English on
   request, remembered in localStorage), number and duration wording, and calls to the JSON API
   with its problem documents turned into plain language. */
"use strict";
(function () {
  const TEXTS = JSON.parse(document.getElementById("texts").textContent);
  const STORE = "meterai.lang";
  const listeners = [];

  function stored() {
    try { return localStorage.getItem(STORE); } catch (e) { return null; }
  }
  function remember(value) {
    try { localStorage.setItem(STORE, value); } catch (e) { /* private mode: not kept */ }
  }

  // ?lang= wins (and is remembered), then the remembered choice, then what the server sent.
  let lang = document.documentElement.lang;
  const asked = new URLSearchParams(location.search).get("lang");
  if (asked && TEXTS[asked]) { lang = asked; remember(asked); }
  else if (TEXTS[stored()]) { lang = stored(); }
  if (!TEXTS[lang]) { lang = "id"; }

  function fill(text, values) {
    return values ? text.replace(/\{(\w+)\}/g, (m, k) => (k in values ? String(values[k]) : m)) : text;
  }
  function t(key, values) {
    const text = TEXTS[lang][key] !== undefined ? TEXTS[lang][key] : (TEXTS.id[key] || key);
    return fill(text, values);
  }
  function number(value) {
    return new Intl.NumberFormat(t("locale")).format(value);
  }
  function rupiah(value) {
    return "Rp " + number(value);
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) { return t("eta_unknown"); }
    if (seconds < 60) { return t("eta_under_minute"); }
    const minutes = Math.round(seconds / 60);
    if (minutes < 60) { return t("eta_minutes", { m: minutes }); }
    return t("eta_hours", { h: Math.floor(minutes / 60), m: minutes % 60 });
  }
  function clock(date, withDate) {
    const options = { hour: "2-digit", minute: "2-digit", timeZoneName: "short" };
    if (withDate) { options.day = "numeric"; options.month = "long"; }
    return date.toLocaleString(t("locale"), options);
  }
  // A URL on this site in the current language (the default language needs no parameter).
  function localUrl(path) {
    return lang === "id" ? path : path + "?lang=" + lang;
  }

  function apply() {
    const other = lang === "id" ? "en" : "id";
    document.documentElement.lang = lang;
    document.title = t(document.body.dataset.title);
    document.querySelectorAll("[data-t]").forEach((element) => { element.textContent = t(element.dataset.t); });
    const link = document.getElementById("lang-switch");
    link.textContent = TEXTS[other].lang_name;
    link.lang = other;
    link.hreflang = other;
    link.href = "?lang=" + other;
    listeners.forEach((listener) => listener(lang));
  }

  // Without JavaScript the switch is a plain link (?lang=); with it, the page switches in place.
  document.getElementById("lang-switch").addEventListener("click", (event) => {
    event.preventDefault();
    lang = lang === "id" ? "en" : "id";
    remember(lang);
    const url = new URL(location.href);
    url.searchParams.set("lang", lang);
    history.replaceState(null, "", url);
    apply();
  });

  // One call to the API: {ok, status, body, problem, retryAfter}; status 0 when unreachable.
  async function call(method, path, options) {
    options = options || {};
    const init = { method: method, credentials: "same-origin", cache: "no-store", headers: options.headers || {} };
    if (options.json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.json);
    } else if (options.form !== undefined) {
      init.body = options.form;
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      return { ok: false, status: 0, body: null, problem: { code: "network" }, retryAfter: null };
    }
    let body = null;
    try { body = await response.json(); } catch (error) { body = null; }
    const retry = parseInt(response.headers.get("Retry-After") || "", 10);
    return {
      ok: response.ok,
      status: response.status,
      body: response.ok ? body : null,
      problem: response.ok ? null : (body && typeof body === "object" ? body : { code: "http_" + response.status }),
      retryAfter: Number.isFinite(retry) ? retry : null,
    };
  }
  // A problem document in plain language: our wording for its code, else its own detail.
  function problemText(problem) {
    const key = "err_" + (problem && problem.code);
    if (TEXTS[lang][key] !== undefined) { return t(key, problem); }
    return t("err_generic", { detail: (problem && (problem.detail || problem.title)) || "?" });
  }
  function randomKey() {
    if (crypto.randomUUID) { return crypto.randomUUID(); }
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  window.Meterai = {
    t: t, number: number, rupiah: rupiah, duration: duration, clock: clock, localUrl: localUrl,
    call: call, problemText: problemText, randomKey: randomKey,
    lang: () => lang,
    onLanguage: (listener) => { listeners.push(listener); },
  };
  apply();
})();
