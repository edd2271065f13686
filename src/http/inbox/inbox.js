// The agent inbox's only script: live updates (server-sent events), the history panel, and a JSON
// check of edited parameters before they are sent. The page works without it.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;

  if (page === "list" || page === "detail") {
    const live = document.getElementById("live");
    const es = new EventSource("/inbox/events");
    es.addEventListener("approvals", (e) => {
      const d = JSON.parse(e.data);
      body.dataset.updates = String(Number(body.dataset.updates || 0) + 1);
      if (live) live.classList.add("on");
      if (page === "list" && d.digest !== body.dataset.digest) {
        const typing = document.activeElement && document.activeElement.form;
        if (!typing) location.reload();
      }
      if (page === "detail" && body.dataset.open === "true" && !d.ids.includes(body.dataset.id)) {
        const gone = document.getElementById("gone");
        if (gone) gone.classList.remove("hidden");
      }
    });
    es.onerror = () => { if (live) live.classList.remove("on"); };
  }

  const history = document.getElementById("history");
  if (history) {
    fetch(history.dataset.src, { credentials: "same-origin" })
      .then((r) => r.text().then((t) => ({ ok: r.ok, t })))
      .then(({ ok, t }) => {
        if (ok) { history.innerHTML = t; history.classList.add("loaded"); }
        else { history.textContent = "The history could not be read."; }
      })
      .catch(() => { history.textContent = "The history could not be read."; });
  }

  const edit = document.getElementById("edit-form");
  if (edit) {
    edit.addEventListener("submit", (e) => {
      const problem = document.getElementById("edit-problem");
      try {
        const v = JSON.parse(document.getElementById("edit-parameters").value);
        if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error("must be a JSON object");
      } catch (err) {
        e.preventDefault();
        problem.textContent = "Parameters: " + err.message;
        problem.classList.remove("hidden");
      }
    });
  }
})();
