// The labeling page's script. Every prompt and response is shown with textContent (never as HTML),
// every state-changing call carries the session's CSRF token, and every submission an idempotency
// key kept until it is stored: a retry, or a second click, stores once.
"use strict";

(() => {
  const body = document.body;
  const main = document.getElementById("main");
  let session = null;

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // -- helpers ---------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);  // strings become text nodes
    return e;
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function localMidnight() {
    const d = new Date();
    d.setHours(0, 0, 0, 0);
    return d.toISOString();
  }

  async function api(method, path, payload) {
    const opts = { method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
    if (payload !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.headers["X-CSRF-Token"] = session ? session.csrf_token : "";
      opts.body = JSON.stringify(payload);
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (e) {
      throw new ApiError(0, "The server could not be reached (" + e.message + ").");
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      if (resp.status === 401 && method === "GET") location.assign("/login");
      throw new ApiError(resp.status, (data && data.error) || ("The server answered " + resp.status + "."));
    }
    return data;
  }

  function say(region, text) {  // a live region: screen readers hear it, everyone sees it
    region.textContent = "";
    region.textContent = text;
  }

  function letter(i) { return "Response " + String.fromCharCode(65 + i); }

  async function showProgress() {
    if (!session.labeler) return;
    try {
      const p = await api("GET", "/api/progress?since=" + encodeURIComponent(localMidnight()));
      say(document.getElementById("progress"), "Done today: " + p.done_today + " · Remaining: " + p.remaining);
    } catch (e) { /* progress is a nicety; the task still works */ }
  }

  async function nextTaskUrl() {
    const list = await api("GET", "/api/tasks");
    return list.tasks.length ? "/tasks/" + encodeURIComponent(list.tasks[0].task_id) : "/tasks";
  }

  // -- the answer shared by every mode: submit with one idempotency key, keep the form on failure --
  function submitter(form, path, payloadOf) {
    const state = { key: newKey(), started: Date.now(), seconds: null, busy: false };
    form.dataset.idempotencyKey = state.key;
    const error = el("p", { id: "submit-error", class: "error", role: "alert" });
    const status = el("p", { id: "submit-status", class: "ok", role: "status", "aria-live": "polite" });
    async function submit(button) {
      if (state.busy) return;
      let payload;
      try {
        payload = payloadOf();
      } catch (e) {
        say(error, e.message);
        return;
      }
      if (state.seconds === null) state.seconds = Math.round((Date.now() - state.started) / 100) / 10;
      payload.idempotency_key = state.key;
      payload.seconds_spent = state.seconds;
      state.busy = true;  // a second press while this one is on its way does nothing
      button.setAttribute("aria-disabled", "true");  // (not disabled: that would take the focus away)
      form.setAttribute("aria-busy", "true");
      say(error, "");
      say(status, "Sending…");
      try {
        const r = await api("POST", path, payload);
        say(status, r.duplicate ? "Already stored (this answer was received before). Loading your next task…"
          : "Stored. Loading your next task…");
        await showProgress();
        const next = await nextTaskUrl();
        setTimeout(() => location.assign(next), 600);
      } catch (e) {
        say(status, "");
        let text = "Not stored: " + e.message;
        if (e.status === 409) text += " Nothing more to do here.";
        else if (e.status === 403 || e.status === 404) text += " This task is not yours to answer.";
        else text += " Everything you entered is kept; press the button again to retry.";
        say(error, text);
      } finally {
        button.removeAttribute("aria-disabled");
        state.busy = false;
        form.removeAttribute("aria-busy");
      }
    }
    return { submit, error, status };
  }

  // -- flags and quality, per candidate ---------------------------------------------------------
  function labelsEditor(i, labels) {
    const mine = labels[i] = { flags: new Set(), quality: 0 };
    const boxes = session.flags.map((f) => {
      const id = "flag-" + i + "-" + f.name;
      const box = el("input", { type: "checkbox", id, class: "flag", "data-flag": f.name,
        onchange: (ev) => { if (ev.target.checked) mine.flags.add(f.name); else mine.flags.delete(f.name); } });
      return el("label", { for: id }, box, " " + f.words);
    });
    const qid = "quality-" + i;
    const quality = el("select", { id: qid, class: "quality", onchange: (ev) => { mine.quality = Number(ev.target.value); } },
      el("option", { value: "0", text: "not rated" }),
      ...[1, 2, 3, 4, 5, 6, 7].map((q) => el("option", { value: String(q), text: String(q) + (q === 1 ? " (worst)" : q === 7 ? " (best)" : "") })));
    return el("details", { class: "labels" },
      el("summary", { text: "Flags and quality of " + letter(i) }),
      el("fieldset", { class: "flags" }, el("legend", { text: "Flags" }), ...boxes),
      el("p", {}, el("label", { for: qid }, "Overall quality (1–7) "), quality));
  }

  function labelsPayload(labels) {
    return Object.entries(labels).map(([i, x]) => ({ index: Number(i), flags: Array.from(x.flags), quality: x.quality }))
      .filter((x) => x.flags.length || x.quality);
  }

  function promptSection(task) {
    return el("section", { "aria-labelledby": "prompt-h" },
      el("h2", { id: "prompt-h", text: "Prompt" }),
      el("div", { class: "text prompt", id: "prompt" }, task.prompt));
  }

  // -- ranking ----------------------------------------------------------------------------------
  function rankingTask(task) {
    const order = task.candidates.map((_, i) => i);  // candidate indices, best first
    const tied = new Set();  // candidates tied with the one ranked just above them
    const labels = {};
    const live = el("p", { class: "visually-hidden", role: "status", "aria-live": "assertive", id: "announce" });
    const list = el("ol", { class: "ranking", id: "ranking", "aria-describedby": "ranking-help" });
    const cards = task.candidates.map((text, i) => card(i, text));

    function card(i, text) {
      const up = el("button", { type: "button", class: "quiet up", "aria-label": "Move " + letter(i) + " up", text: "↑ Up",
        onclick: () => move(i, -1) });
      const down = el("button", { type: "button", class: "quiet down", "aria-label": "Move " + letter(i) + " down", text: "↓ Down",
        onclick: () => move(i, +1) });
      const tieId = "tie-" + i;
      const tie = el("input", { type: "checkbox", id: tieId, class: "tie",
        onchange: (ev) => { setTie(i, ev.target.checked); } });
      const c = el("li", { class: "card", tabindex: "0", draggable: "true", "data-index": String(i) },
        el("div", { class: "card-head" },
          el("span", { class: "rank", "aria-hidden": "true" }), el("span", { class: "name", text: letter(i) }),
          el("span", { class: "moves" }, up, down,
            el("label", { for: tieId }, tie, " Tied with the one above"))),
        el("div", { class: "text candidate" }, text),
        labelsEditor(i, labels));
      c.addEventListener("keydown", (ev) => onKey(ev, i));
      c.addEventListener("dragstart", (ev) => { ev.dataTransfer.setData("text/plain", String(i)); ev.dataTransfer.effectAllowed = "move"; c.classList.add("dragging"); });
      c.addEventListener("dragend", () => { c.classList.remove("dragging"); clearDrop(); });
      c.addEventListener("dragover", (ev) => { ev.preventDefault(); clearDrop(); c.classList.add(after(ev, c) ? "drop-after" : "drop-before"); });
      c.addEventListener("dragleave", () => { c.classList.remove("drop-before", "drop-after"); });
      c.addEventListener("drop", (ev) => {
        ev.preventDefault();
        const from = Number(ev.dataTransfer.getData("text/plain"));
        clearDrop();
        if (Number.isInteger(from) && from !== i) place(from, order.indexOf(i) + (after(ev, c) ? 1 : 0));
      });
      return c;
    }

    function after(ev, c) { const r = c.getBoundingClientRect(); return ev.clientY > r.top + r.height / 2; }
    function clearDrop() { for (const c of cards) c.classList.remove("drop-before", "drop-after"); }

    function groups() {
      const out = [];
      order.forEach((i, pos) => { if (pos > 0 && tied.has(i)) out[out.length - 1].push(i); else out.push([i]); });
      return out;
    }

    function render() {
      tied.delete(order[0]);  // the best response is tied with nothing above it
      const rankOf = {};
      groups().forEach((g, r) => g.forEach((i) => { rankOf[i] = r + 1; }));
      list.replaceChildren(...order.map((i) => cards[i]));
      order.forEach((i, pos) => {
        const c = cards[i];
        const isTied = tied.has(i);
        c.querySelector(".rank").textContent = "#" + rankOf[i];
        c.classList.toggle("tied", isTied);
        c.setAttribute("aria-label", letter(i) + ", rank " + rankOf[i] + " of " + order.length +
          (isTied ? ", tied with the response above" : ""));
        const tie = c.querySelector(".tie");
        tie.checked = isTied;
        tie.disabled = pos === 0;
        c.querySelector(".up").disabled = pos === 0;
        c.querySelector(".down").disabled = pos === order.length - 1;
      });
    }

    function place(i, to) {  // move candidate i to position `to` (in the order before removal)
      const from = order.indexOf(i);
      order.splice(from, 1);
      order.splice(to > from ? to - 1 : to, 0, i);
      render();
      say(live, letter(i) + " moved to position " + (order.indexOf(i) + 1) + " of " + order.length + ".");
    }

    function move(i, delta) {
      const pos = order.indexOf(i);
      const to = pos + delta;
      if (to < 0 || to >= order.length) return;
      order.splice(pos, 1);
      order.splice(to, 0, i);
      render();
      const focused = document.activeElement;
      if (focused && focused.classList.contains("up") && to === 0) cards[i].querySelector(".down").focus();
      if (focused && focused.classList.contains("down") && to === order.length - 1) cards[i].querySelector(".up").focus();
      say(live, letter(i) + " moved to position " + (to + 1) + " of " + order.length + ".");
    }

    function setTie(i, on) {
      if (on && order.indexOf(i) > 0) tied.add(i); else tied.delete(i);
      render();
      say(live, letter(i) + (tied.has(i) ? " is tied with the response above." : " is no longer tied."));
    }

    function onKey(ev, i) {
      if (ev.target !== cards[i]) return;  // keys typed into the flags and ratings stay there
      const pos = order.indexOf(i);
      if (ev.altKey && ev.key === "ArrowUp") { move(i, -1); cards[i].focus(); }
      else if (ev.altKey && ev.key === "ArrowDown") { move(i, +1); cards[i].focus(); }
      else if (ev.key === "ArrowUp" && pos > 0) cards[order[pos - 1]].focus();
      else if (ev.key === "ArrowDown" && pos < order.length - 1) cards[order[pos + 1]].focus();
      else if (ev.key === "t" || ev.key === "T") setTie(i, !tied.has(i));
      else return;
      ev.preventDefault();
    }

    const form = el("form", { id: "answer", novalidate: true });
    const sub = submitter(form, "/api/tasks/" + encodeURIComponent(task.task_id) + "/ranking",
      () => ({ ranking: groups(), labels: labelsPayload(labels) }));
    const button = el("button", { type: "submit", id: "submit", text: "Submit ranking" });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); sub.submit(button); });
    form.append(
      el("h2", { text: "Rank the responses, best first" }),
      el("p", { class: "help", id: "ranking-help" },
        "Drag a response, or focus it and press ", el("kbd", { text: "Alt" }), "+", el("kbd", { text: "↑" }), " / ",
        el("kbd", { text: "Alt" }), "+", el("kbd", { text: "↓" }), " to move it; ", el("kbd", { text: "↑" }), " / ",
        el("kbd", { text: "↓" }), " go to the next response; ", el("kbd", { text: "T" }),
        " ties it with the one above. Every control is also reachable with Tab."),
      list, live, sub.error, sub.status, el("div", { class: "actions" }, button));
    render();
    return form;
  }

  // -- best of K --------------------------------------------------------------------------------
  function bestOfKTask(task) {
    const labels = {};
    let best = null;
    const choices = task.candidates.map((text, i) => {
      const id = "best-" + i;
      return el("div", { class: "choice" },
        el("input", { type: "radio", name: "best", id, value: String(i), onchange: () => { best = i; } }),
        el("label", { for: id, class: "name" }, " " + letter(i)),
        el("div", { class: "text candidate" }, text),
        labelsEditor(i, labels));
    });
    const form = el("form", { id: "answer", novalidate: true });
    const sub = submitter(form, "/api/tasks/" + encodeURIComponent(task.task_id) + "/best-of-k", () => {
      if (best === null) throw new Error("Choose the best response first.");
      return { best_index: best, labels: labelsPayload(labels) };
    });
    const button = el("button", { type: "submit", id: "submit", text: "Submit choice" });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); sub.submit(button); });
    form.append(el("fieldset", {}, el("legend", { text: "Which response is best?" }), ...choices),
      sub.error, sub.status, el("div", { class: "actions" }, button));
    return form;
  }

  // -- demonstration ----------------------------------------------------------------------------
  function demonstrationTask(task) {
    const area = el("textarea", { id: "response", name: "response", required: true, spellcheck: "true" });
    const form = el("form", { id: "answer", novalidate: true });
    const sub = submitter(form, "/api/tasks/" + encodeURIComponent(task.task_id) + "/demonstration", () => {
      if (!area.value.trim()) throw new Error("Write the response first.");
      return { response: area.value };
    });
    const button = el("button", { type: "submit", id: "submit", text: "Submit response" });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); sub.submit(button); });
    form.append(el("h2", {}, el("label", { for: "response" }, "Write the response this prompt should get")),
      area, sub.error, sub.status, el("div", { class: "actions" }, button));
    return form;
  }

  // -- skip -------------------------------------------------------------------------------------
  function skipSection(task) {
    const reason = el("select", { id: "skip-reason" }, el("option", { value: "", text: "Choose a reason" }),
      ...session.skip_reasons.map((r) => el("option", { value: r.name, text: r.words })));
    const comment = el("textarea", { id: "skip-comment", maxlength: "1000", rows: "3" });
    const form = el("form", { id: "skip", novalidate: true });
    const sub = submitter(form, "/api/tasks/" + encodeURIComponent(task.task_id) + "/skip", () => {
      if (!reason.value) throw new Error("Choose why you skip this task.");
      return { reason: reason.value, comment: comment.value };
    });
    const button = el("button", { type: "submit", id: "skip-submit", class: "quiet", text: "Skip this task" });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); sub.submit(button); });
    form.append(el("p", { class: "stack" }, el("label", { for: "skip-reason" }, "Reason"), reason),
      el("p", { class: "stack" }, el("label", { for: "skip-comment" }, "Comment (optional)"), comment),
      sub.error, sub.status, el("div", { class: "actions" }, button));
    return el("details", { class: "skip" }, el("summary", { text: "Skip this task" }), form);
  }

  // -- pages ------------------------------------------------------------------------------------
  async function taskPage() {
    const id = body.dataset.taskId;
    const task = await api("GET", "/api/tasks/" + encodeURIComponent(id));
    const heading = { ranking: "Rank the responses", best_of_k: "Choose the best response",
      demonstration: "Write a demonstration" }[task.mode];
    document.title = heading + " · RLHF labeling";
    const answer = task.mode === "ranking" ? rankingTask(task) : task.mode === "best_of_k" ? bestOfKTask(task)
      : demonstrationTask(task);
    main.replaceChildren(el("h1", { text: heading }), promptSection(task), answer, skipSection(task));
  }

  async function tasksPage() {
    const list = await api("GET", "/api/tasks");
    const words = { ranking: "ranking", best_of_k: "best of K", demonstration: "demonstration" };
    if (!list.tasks.length) {
      main.replaceChildren(el("h1", { text: "My tasks" }), el("p", { text: "Nothing to do right now. New tasks appear here when they are assigned to you." }));
      return;
    }
    const items = list.tasks.map((t) => el("li", {},
      el("a", { href: "/tasks/" + encodeURIComponent(t.task_id) }, words[t.mode] + (t.k ? " of " + t.k : "")),
      " ", el("span", { class: "excerpt" }, "— " + t.prompt.slice(0, 120) + (t.prompt.length > 120 ? "…" : ""))));
    main.replaceChildren(el("h1", { text: "My tasks" }),
      el("p", {}, el("a", { href: "/tasks/" + encodeURIComponent(list.tasks[0].task_id), id: "start" }, "Start with the oldest task")),
      el("ul", { class: "tasks", id: "task-list" }, ...items));
  }

  function table(caption, head, rows) {
    return el("table", {}, el("caption", { class: "visually-hidden", text: caption }),
      el("thead", {}, el("tr", {}, ...head.map(([h, num]) => el("th", { scope: "col", class: num ? "num" : null, text: h })))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map(([v, num]) => el("td", { class: num ? "num" : null, text: String(v) }))))));
  }

  function pct(x) { return x === null || x === undefined ? "—" : (100 * x).toFixed(1) + " %"; }

  async function adminPage() {
    const s = await api("GET", "/api/admin/stats?since=" + encodeURIComponent(localMidnight()));
    const n = (c, k) => (c && c[k]) || 0;
    const done = (c) => n(c, "ranking") + n(c, "best_of_k") + n(c, "demonstration") + n(c, "skip");
    const labelers = table("Labelers", [["Labeler"], ["Role"], ["Done today", 1], ["Rankings", 1], ["Best of K", 1],
      ["Demonstrations", 1], ["Skips", 1], ["Open tasks", 1], ["Median time per task", 1]],
    s.labelers.map((l) => [[l.name + (l.active ? "" : " (revoked)") + (l.registered ? "" : " (not registered)")],
      [l.admin ? "admin" : "labeler"], [done(l.today), 1], [n(l.total, "ranking"), 1], [n(l.total, "best_of_k"), 1],
      [n(l.total, "demonstration"), 1], [n(l.total, "skip"), 1], [l.admin ? "—" : l.open_tasks, 1],
      [l.median_seconds ? l.median_seconds.toFixed(1) + " s" : "—", 1]]));
    const reasons = table("Skip reasons", [["Reason"], ["Skips", 1]], s.skip_reasons.map((r) => [[r.words], [r.count, 1]]));
    const a = s.agreement;
    const pairs = table("Agreement between labelers", [["Labeler"], ["Labeler"], ["Tasks", 1], ["Pairs", 1], ["Agreement", 1]],
      a.labeler_pairs.map((p) => [[p.a], [p.b], [p.tasks, 1], [p.pairs, 1], [pct(p.ratio), 1]]));
    main.replaceChildren(el("h1", { text: "Labeling overview" }),
      el("p", { id: "tasks-open" }, "Tasks waiting for an answer: " + s.tasks_open),
      el("h2", { text: "Labelers" }), labelers,
      el("h2", { text: "Agreement on doubly-assigned tasks" }),
      el("p", { id: "agreement" }, "Pairwise agreement: " + pct(a.ratio) + " over " + a.pairs + " candidate pairs of " + a.tasks +
        (a.tasks === 1 ? " task" : " tasks") + " (two labelers agree on a pair when both rank the same response higher, or both tie them)."),
      pairs,
      el("h2", { text: "Skip reasons" }), reasons);
  }

  async function start() {
    document.getElementById("sign-out").addEventListener("click", async () => {
      try { await api("POST", "/logout", {}); } finally { location.assign("/login"); }
    });
    try {
      session = await api("GET", "/api/session");
      document.getElementById("who").textContent = "Signed in as " + session.name;
      document.getElementById("nav-admin").hidden = !session.admin;
      document.getElementById("nav-tasks").hidden = !session.labeler;
      await showProgress();
      const page = body.dataset.page;
      if (page === "task") await taskPage();
      else if (page === "admin") await adminPage();
      else await tasksPage();
    } catch (e) {
      main.replaceChildren(el("h1", { text: "Something went wrong" }), el("p", { class: "error", role: "alert", text: e.message }));
    }
  }

  start();
})();
