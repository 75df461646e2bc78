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
});
