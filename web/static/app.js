// Progressive enhancement only: every page works without this file.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // "Copy" buttons next to DNS names and values.
  for (const button of document.querySelectorAll("button.copy[data-copy]")) {
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(button.dataset.copy);
        button.textContent = "Copied";
      } catch (err) {
        button.textContent = "Select and copy";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
  }
  // Disable a form's buttons once submitted, so a slow step (DNS check) is not sent twice.
  for (const form of document.querySelectorAll("form")) {
    form.addEventListener("submit", (event) => {
      const pressed = event.submitter;
      if (pressed && pressed.name) {
        const keep = document.createElement("input");
        keep.type = "hidden";
        keep.name = pressed.name;
        keep.value = pressed.value;
        form.appendChild(keep);
      }
      for (const button of form.querySelectorAll("button[type=submit]")) {
        button.disabled = true;
      }
      if (pressed && pressed.id === "check-now") {
        pressed.textContent = "Checking…";
      }
      if (pressed && pressed.id === "test-relay") {
        pressed.textContent = "Testing…";
      }
    });
  }
  // Sending: the relay's fields only when a relay is chosen; the port's placeholder follows the TLS mode.
  const sending = document.getElementById("sending-form");
  if (sending) {
    const relayFields = document.getElementById("relay-fields");
    const testButton = document.getElementById("test-relay");
    const tls = document.getElementById("f-relay_tls");
    const port = document.getElementById("f-relay_port");
    const defaults = { starttls: "587", implicit: "465" };
    const showRelay = () => {
      const relay = sending.querySelector("input[name=mode][value=relay]").checked;
      relayFields.hidden = !relay;
      testButton.hidden = !relay;
    };
    for (const radio of sending.querySelectorAll("input[name=mode]")) {
      radio.addEventListener("change", showRelay);
    }
    showRelay();
    tls.addEventListener("change", () => {
      port.placeholder = defaults[tls.value] || "587";
      if (Object.values(defaults).includes(port.value)) {
        port.value = port.placeholder;  // a default port follows the mode; another one is kept
      }
    });
  }
  // Backups: progress of long work, polled from the server (so it survives a reload), and uploads
  // sent with XMLHttpRequest for their upload progress.
  const size = (count) => {
    let value = Number(count) || 0;
    for (const unit of ["bytes", "KiB", "MiB", "GiB", "TiB"]) {
      if (value < 1024 || unit === "TiB") {
        return unit === "bytes" ? `${Math.floor(value)} ${unit}` : `${value.toFixed(1)} ${unit}`;
      }
      value /= 1024;
    }
    return String(count);
  };
  const fill = (box, state) => {
    const set = (name, text) => {
      for (const el of box.querySelectorAll(`[data-field=${name}]`)) { el.textContent = text; }
    };
    set("percent", state.percent);
    set("done", size(state.done));
    set("total", size(state.total));
    if (state.stage !== undefined) { set("stage", state.stage); }
    if (state.name !== undefined) { set("name", state.name); }
    const bar = box.querySelector("progress");
    if (bar) { bar.value = state.percent; }
  };
  const watch = (box) => {
    const key = box.id === "download-progress" ? "download" : "job";
    let seen = false;
    const poll = async () => {
      let state = null;
      try {
        // Not followed: a box restored from a backup made before this login has no session for it,
        // and the redirect's login page is no JSON (the poll went on every 2 s, "running 0 %" forever).
        const answer = await fetch(box.dataset.progress, { cache: "no-store", credentials: "same-origin",
                                                           redirect: "manual" });
        if (!answer.ok) {
          if (seen || key === "job") { window.location.reload(); }  // a restored box restarted: start over
          return;
        }
        state = (await answer.json())[key];
      } catch (err) {
        setTimeout(poll, 2000);  // the box may be restarting on restored data
        return;
      }
      if (state && (key === "job" ? state.running : state.stage === "downloading")) {
        seen = true;
        box.hidden = false;
        fill(box, state);
        setTimeout(poll, 1000);
      } else if (key === "job") {
        window.location.reload();  // the result (and any message) is on the page
      } else if (state) {
        fill(box, state);
      }
    };
    setTimeout(poll, 1000);
  };
  for (const box of document.querySelectorAll("[data-progress][data-running]")) {
    watch(box);
  }
  const downloads = document.getElementById("download-progress");
  if (downloads) {
    for (const link of document.querySelectorAll("#backup-list a[download]")) {
      link.addEventListener("click", () => { downloads.dataset.running = ""; watch(downloads); });
    }
  }
  for (const form of document.querySelectorAll("form[data-upload]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const shown = form.querySelector(".upload-progress");
      const request = new XMLHttpRequest();
      request.open("POST", form.action);
      request.upload.addEventListener("progress", (progress) => {
        if (!shown || !progress.lengthComputable) { return; }
        shown.hidden = false;
        fill(shown, { percent: Math.floor(progress.loaded * 100 / progress.total), done: progress.loaded,
                      total: progress.total });
      });
      request.addEventListener("load", () => {
        // The answer is a whole page (the manifest to confirm, or the form with a message).
        history.replaceState(null, "", request.responseURL);
        document.open();
        document.write(request.responseText);
        document.close();
      });
      request.addEventListener("error", () => {
        if (shown) { shown.textContent = "The upload failed: check the connection and try again."; }
        for (const button of form.querySelectorAll("button[type=submit]")) { button.disabled = false; }
      });
      request.send(new FormData(form));
    });
  }
});
