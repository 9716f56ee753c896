// Progressive enhancement only: the upload form and the result page work without this file.
"use strict";

(function () {
  const input = document.getElementById("file");
  const zone = document.getElementById("dropzone");
  const chosen = document.getElementById("chosen");
  const form = document.getElementById("upload-form");

  if (input && zone) {
    const maxFiles = Number(input.dataset.maxFiles) || Infinity;
    const showChosen = () => {
      const names = Array.from(input.files, (file) => file.name);
      chosen.textContent = names.length > 1 ? `${names.length} files: ${names.join(", ")}` : (names[0] || "");
      // The server answers 413 above the limit; saying so before the upload saves sending it.
      input.setCustomValidity(names.length > maxFiles ? `At most ${maxFiles} files can be screened at once.` : "");
    };
    input.addEventListener("change", showChosen);
    ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    }));
    ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("dragging")));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      if (event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        showChosen();
      }
    });
    form.addEventListener("submit", () => {
      const button = document.getElementById("submit");
      button.disabled = true;
      button.textContent = "Screening…";
    });
  }

  // Result page: lay the blended overlay over the original and let a slider fade it.
  const original = document.getElementById("original");
  const overlay = document.getElementById("overlay");
  const stack = document.getElementById("overlay-stack");
  const control = document.getElementById("opacity-control");
  const slider = document.getElementById("opacity");
  if (original && overlay && stack && slider) {
    const base = document.createElement("img");
    base.src = original.src;
    base.alt = "";
    stack.insertBefore(base, overlay);
    stack.classList.add("layered");
    control.hidden = false;
    const apply = () => { overlay.style.opacity = String(slider.value / 100); };
    slider.addEventListener("input", apply);
    apply();
  }
})();
