/* The purchase page: order stamps, show how to pay and watch for the payment, upload a PDF
   and watch the stamping job until it can be downloaded. Every call carries the admission
   cookie; when it has lapsed, one status call to the room renews it (if the turn still holds). */
"use strict";
(function () {
  const M = window.Meterai;
  const $ = (id) => document.getElementById(id);
  const PURCHASE = "meterai.purchase";
  const JOBS = "meterai.jobs";
  const RELOADED = "meterai.reloaded";
  const PURCHASE_POLL_MS = 4000;
  const JOB_POLL_MS = 2000;

  if (!$("purchase-app")) {
    // Not admitted as far as the server could tell: if the room still counts this ticket as
    // admitted, the status call renews the credential, and one reload shows the purchase form.
    M.call("GET", "/queue/status").then((answer) => {
      const last = Number(sessionStorage.getItem(RELOADED) || 0);
      if (answer.ok && answer.body.state === "admitted" && Date.now() - last > 60000) {
        sessionStorage.setItem(RELOADED, String(Date.now()));
        location.reload();
      }
    });
    return;
  }

  let purchase = null;
  let jobs = [];                     // [{name, job}], newest first
  let buying = false;
  let uploading = false;
  let buyProblem = null;
  let uploadProblem = null;
  let sessionProblem = null;
  let purchaseTimer = null;
  // The Idempotency-Key of an order or upload whose answer never came (the network, a busy
  // server): pressing again sends the same request under the same key, so the server replays
  // what it did instead of ordering twice, or finding the stamp already taken by the upload
  // whose answer was lost. Any change to the form makes it another request, with a new key.
  let buyKey = null;
  let uploadKey = null;

  // Whether an answer settles its request (done or refused), or leaves it to be tried again.
  function settled(answer) {
    return answer.status >= 200 && answer.status < 500 && answer.status !== 429;
  }

  function load(key, fallback) {
    try { return JSON.parse(localStorage.getItem(key)) || fallback; } catch (error) { return fallback; }
  }
  function save() {
    try {
      localStorage.setItem(PURCHASE, JSON.stringify(purchase ? purchase.id : null));
      localStorage.setItem(JOBS, JSON.stringify(jobs.slice(0, 10).map((e) => ({ id: e.job.id, name: e.name }))));
    } catch (error) { /* private mode: not kept */ }
  }

  // An API call; on 401 the room is asked once to renew the admission, then the call is retried.
  async function api(method, path, options) {
    const answer = await M.call(method, path, options);
    if (answer.status !== 401) { return answer; }
    const renewed = await M.call("GET", "/queue/status");
    if (renewed.ok && renewed.body.state === "admitted") {
      const again = await M.call(method, path, options);
      if (again.status !== 401) { return again; }
    }
    sessionProblem = answer.problem;
    render();
    return answer;
  }

  // --- buying ----------------------------------------------------------------------------

  $("buy-form").addEventListener("input", () => { buyKey = null; });
  $("upload-form").addEventListener("input", () => { uploadKey = null; });
  $("upload-form").addEventListener("change", () => { uploadKey = null; });

  $("buy-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (buying) { return; }
    buying = true;
    buyProblem = null;
    render();
    const quantity = parseInt($("quantity").value, 10);
    buyKey = buyKey || M.randomKey();
    const answer = await api("POST", "/api/v1/purchases", {
      json: { quantity: quantity }, headers: { "Idempotency-Key": buyKey },
    });
    buying = false;
    if (settled(answer)) { buyKey = null; }
    if (answer.ok) {
      purchase = answer.body;
      save();
      watchPurchase();
    } else {
      buyProblem = answer.problem;
    }
    render();
  });

  function watchPurchase() {
    clearTimeout(purchaseTimer);
    if (!purchase || purchase.status !== "pending_payment") { return; }
    purchaseTimer = setTimeout(async () => {
      const answer = await api("GET", "/api/v1/purchases/" + purchase.id);
      if (answer.ok) {
        purchase = answer.body;
      } else if (answer.status === 404) {
        purchase = null;
      }
      save();
      render();
      watchPurchase();
    }, PURCHASE_POLL_MS);
  }

  // --- stamping --------------------------------------------------------------------------

  $("upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = $("document").files[0];
    if (!file || uploading) { return; }
    const form = new FormData();
    form.append("file", file, file.name);
    const page = $("page").value.trim();
    if (page) { form.append("page", page); }
    uploading = true;
    uploadProblem = null;
    render();
    uploadKey = uploadKey || M.randomKey();
    const answer = await api("POST", "/api/v1/stampings", {
      form: form, headers: { "Idempotency-Key": uploadKey },
    });
    uploading = false;
    if (settled(answer)) { uploadKey = null; }
    if (answer.ok) {
      const entry = { name: file.name, job: answer.body };
      jobs = [entry].concat(jobs.filter((e) => e.job.id !== entry.job.id));
      save();
      $("upload-form").reset();
      watchJob(entry);
    } else {
      uploadProblem = answer.problem;
    }
    render();
  });

  function watchJob(entry) {
    if (entry.job.status === "done" || entry.job.status === "failed") { return; }
    setTimeout(async () => {
      const answer = await api("GET", "/api/v1/stampings/" + entry.job.id);
      if (answer.ok) {
        entry.job = answer.body;
      } else if (answer.status === 404) {
        jobs = jobs.filter((other) => other !== entry);
        save();
        render();
        return;
      }
      save();
      render();
      watchJob(entry);
    }, JOB_POLL_MS);
  }

  // --- showing it ------------------------------------------------------------------------

  function showProblem(id, problem) {
    $(id).hidden = !problem;
    $(id).textContent = problem ? M.problemText(problem) : "";
  }

  function jobItem(entry) {
    const item = document.createElement("li");
    const name = document.createElement("strong");
    name.textContent = entry.name;
    const state = document.createElement("p");
    const job = entry.job;
    if (job.status === "failed") {
      state.textContent = M.t("job_failed", { reason: M.problemText(job.error || {}) });
    } else {
      state.textContent = M.t("job_" + job.status);
      state.className = job.status === "done" ? "ok" : "";
    }
    item.append(name, state);
    if (job.serial) {
      const serial = document.createElement("p");
      serial.className = "muted";
      serial.textContent = M.t("serial_label") + ": " + job.serial;
      item.append(serial);
    }
    if (job.status === "done") {
      const link = document.createElement("a");
      link.className = "button";
      link.href = "/api/v1/stampings/" + job.id + "/document";
      link.download = "";
      link.textContent = M.t("download");
      item.append(link);
    }
    return item;
  }

  function render() {
    const buyButton = $("buy-form").querySelector("button");
    buyButton.disabled = buying;
    buyButton.textContent = M.t(buying ? "working" : "buy_button");
    const uploadButton = $("upload-form").querySelector("button");
    uploadButton.disabled = uploading;
    uploadButton.textContent = M.t(uploading ? "working" : "upload_button");
    showProblem("buy-problem", buyProblem);
    showProblem("upload-problem", uploadProblem);

    $("reservation").hidden = !purchase;
    if (purchase) {
      $("payment-reference").textContent = purchase.payment_reference || "–";
      $("amount").textContent = M.rupiah(purchase.amount);
      $("expires").textContent = purchase.expires_at ? M.clock(new Date(purchase.expires_at), true) : "–";
      $("purchase-status").textContent = M.t("purchase_" + purchase.status);
      $("purchase-status").className = purchase.status === "paid" ? "ok" : "";
      $("payment-help").hidden = purchase.status !== "pending_payment";
    }

    $("jobs-box").hidden = jobs.length === 0;
    $("jobs").replaceChildren(...jobs.map(jobItem));

    $("session-problem").hidden = !sessionProblem;
    $("session-problem").querySelector("span").textContent = sessionProblem ? M.problemText(sessionProblem) : "";
    $("session-problem").querySelector("a").href = M.localUrl("/");
  }

  // A reload keeps the order and the documents of this browser.
  async function restore() {
    const id = load(PURCHASE, null);
    if (id) {
      const answer = await M.call("GET", "/api/v1/purchases/" + id);
      if (answer.ok) { purchase = answer.body; watchPurchase(); }
    }
    for (const saved of load(JOBS, [])) {
      const answer = await M.call("GET", "/api/v1/stampings/" + saved.id);
      if (answer.ok) {
        const entry = { name: saved.name, job: answer.body };
        jobs.push(entry);
        watchJob(entry);
      }
    }
    save();
    render();
  }

  M.onLanguage(render);
  render();
  restore();
})();
