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
    });
  }
});
