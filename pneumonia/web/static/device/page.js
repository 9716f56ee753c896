// The in-browser screener's page: the server's screening pipeline, step by step, on this device.
// Nothing here sends anything: the page's Content-Security-Policy (connect-src 'self') lets it fetch
// only its own files, and it fetches only the model, its parameters and ONNX Runtime's WebAssembly.
//
//   file ──readHeader (headers.js: size checks before decoding)──> createImageBitmap ──> prepare
//     (screening.js: greyscale, pixel statistics, pixel checks, the server's draft, the resize, the
//     card's contrast and normalisation) ──runModel (model.js)──> scored (the gate, Platt, labels)
//
// This module is the DOM alone; model/screener.json (pneumonia/web/device_site.py) carries every
// number, and tests/test_device.py checks the page against `predict`.
import { ReadError, readHeader } from "./headers.js";
import { loadModel, runModel } from "./model.js";
import { prepare, scored } from "./screening.js";
import { GateVerdict, Outcome } from "./vocabulary.js";

const root = document.getElementById("device");
const $ = (id) => document.getElementById(id);

async function decode(file) {
  let bitmap;
  try {  // the EXIF orientation applied (ImageOps.exif_transpose); no colour management, as Pillow
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (err) {
    throw new ReadError("The image is corrupt or truncated (the browser could not decode it).");
  }
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  return { canvas, width: canvas.width, height: canvas.height, rgba: context.getImageData(0, 0, canvas.width, canvas.height).data };
}

async function screen(model, file) {
  const timing = { started: performance.now() };
  const frame = readHeader(new Uint8Array(await file.arrayBuffer()), model.params.reading);
  const image = await decode(file);
  const prepared = prepare(frame, image, model.params);
  showImage(image.canvas, prepared.grey, model.params.overlay.display_max_side);
  timing.decode = performance.now();
  if (prepared.refusal) return { outcome: Outcome.REFUSED, verdict: prepared.refusal, timing };
  const outputs = await runModel(model, prepared.input);
  timing.model = performance.now();
  return { ...scored(model.params, model.gate, outputs), timing };
}

function showImage(canvas, grey, maxSide) {
  // gradcam.display_image: greyscale, long side at most maxSide
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const data = context.createImageData(canvas.width, canvas.height);
  const words = new Uint32Array(data.data.buffer);  // one RGBA pixel a word (little-endian: A B G R)
  grey.forEach((v, i) => { words[i] = 0xff000000 | (v << 16) | (v << 8) | v; });
  context.putImageData(data, 0, 0);
  const scale = Math.min(1, maxSide / Math.max(canvas.width, canvas.height));
  for (const target of [$("original"), $("overlay-base"), $("overlay")]) {
    target.width = Math.max(1, Math.round(canvas.width * scale));
    target.height = Math.max(1, Math.round(canvas.height * scale));
    const drawing = target.getContext("2d");
    drawing.imageSmoothingQuality = "high";
    drawing.drawImage(canvas, 0, 0, target.width, target.height);
  }
}

function drawOverlay(heat, mapSize, overlay) {
  // gradcam.overlay: the map stretched back bilinearly (cv2.INTER_LINEAR), JET, blended with alpha.
  const canvas = $("overlay");
  const context = canvas.getContext("2d");
  const picture = context.getImageData(0, 0, canvas.width, canvas.height);
  const [rows, columns] = mapSize;
  const at = (i, n, outN) => Math.min(Math.max((i + 0.5) * (n / outN) - 0.5, 0), n - 1);
  for (let y = 0; y < canvas.height; y++) {
    const sy = at(y, rows, canvas.height);
    const [y0, fy] = [Math.floor(sy), sy - Math.floor(sy)];
    const y1 = Math.min(y0 + 1, rows - 1);
    for (let x = 0; x < canvas.width; x++) {
      const sx = at(x, columns, canvas.width);
      const [x0, fx] = [Math.floor(sx), sx - Math.floor(sx)];
      const x1 = Math.min(x0 + 1, columns - 1);
      const top = heat[y0 * columns + x0] * (1 - fx) + heat[y0 * columns + x1] * fx;
      const bottom = heat[y1 * columns + x0] * (1 - fx) + heat[y1 * columns + x1] * fx;
      const colour = overlay.jet[Math.round(255 * (top * (1 - fy) + bottom * fy))];
      const p = 4 * (y * canvas.width + x);
      for (let c = 0; c < 3; c++) picture.data[p + c] = Math.round(colour[c] * overlay.alpha + picture.data[p + c] * (1 - overlay.alpha));
    }
  }
  context.putImageData(picture, 0, 0);
}

function shownProbability(p, floor) {  // ModelCard.shown_probability
  const percent = (x) => String(Number((100 * x).toPrecision(6)));
  if (p < floor) return `< ${percent(floor)} %`;
  if (p > 1 - floor) return `> ${percent(1 - floor)} %`;
  return `${(100 * p).toFixed(1)} %`;
}

function showResult(name, outcome, params) {
  const result = $("result");
  ["read-error", "refused", "screened"].forEach((id) => { $(id).hidden = true; });
  result.dataset.file = name;
  result.dataset.outcome = outcome.outcome;
  const t = outcome.timing;
  result.dataset.ms = String(Math.round(performance.now() - t.started));
  result.dataset.decodeMs = t.decode ? String(Math.round(t.decode - t.started)) : "";
  result.dataset.modelMs = t.model ? String(Math.round(t.model - t.decode)) : "";
  if (outcome.outcome === Outcome.FAILED) {
    result.dataset.reason = "unreadable";
    $("error-message").textContent = outcome.error;
    $("read-error").hidden = false;
  } else if (outcome.outcome === Outcome.REFUSED) {
    showRefusal(outcome.verdict, params);
  } else {
    showScreened(outcome, params);
  }
  result.hidden = false;
}

function showRefusal(verdict, params) {
  $("result").dataset.reason = verdict.reason;
  $("refusal-reason").textContent = params.gate.messages[verdict.reason];
  const measured = `(measured ${verdict.score.toFixed(1)}, limit ${verdict.threshold.toFixed(1)})`;
  $("refusal-detail").textContent = `Check: ${verdict.reason} ${measured}; screened in this browser.`;
  $("refused").hidden = false;
}

function showScreened(outcome, params) {
  const result = $("result");
  result.dataset.probability = String(outcome.probability);
  result.dataset.labelDefault = outcome.labels.default;
  result.dataset.labelScreening = outcome.labels.screening;
  result.dataset.ood = outcome.verdict ? outcome.verdict.verdict : "unchecked";
  result.dataset.heat = JSON.stringify(outcome.heat.map((h) => Number(h.toFixed(5))));
  delete result.dataset.reason;
  $("probability").textContent = shownProbability(outcome.probability, params.probability_floor);
  for (const name of ["default", "screening"]) {
    $(`label-${name}`).textContent = outcome.labels[name];
    $(`label-${name}`).className = `label ${outcome.labels[name].toLowerCase()}`;
  }
  $("ood-warning").hidden = !(outcome.verdict && outcome.verdict.verdict === GateVerdict.UNUSUAL);
  if (params.gate) $("ood-message").textContent = params.gate.unusual_warning;
  $("ood-off").hidden = Boolean(outcome.verdict);
  const target = outcome.labels.default;
  $("caption-pneumonia").hidden = target !== "PNEUMONIA";
  $("caption-normal").hidden = target === "PNEUMONIA";
  $("caption-flat").hidden = outcome.localised;
  $("flat-target").textContent = target;
  drawOverlay(outcome.heat, params.gradcam.map_size, params.overlay);
  const t = outcome.timing;
  $("timing").textContent = `Screened in ${Math.round(t.model - t.started)} ms in this browser (decoding ${Math.round(t.decode - t.started)} ms, model and Grad-CAM ${Math.round(t.model - t.decode)} ms).`;
  $("screened").hidden = false;
}

async function onFile(model, file) {
  const result = $("result");
  result.hidden = true;
  delete result.dataset.file;  // a script waiting for this file's answer waits for the new one
  $("chosen").textContent = file.name;
  $("status").textContent = `Screening ${file.name}…`;
  let outcome;
  try {
    outcome = await screen(model, file);
  } catch (err) {
    const message = err instanceof ReadError ? err.message : `It could not be read (${err.name}).`;
    outcome = { outcome: Outcome.FAILED, error: message, timing: { started: performance.now() } };
  }
  showResult(file.name, outcome, model.params);
  $("status").textContent = "Ready: the model runs in this browser.";
}

function unavailable(err) {
  $("status").dataset.state = "unavailable";
  $("status").textContent = "The model cannot run in this browser.";
  $("unavailable-reason").textContent = err.message;
  $("unavailable").hidden = false;
}

function wire(model) {
  const input = $("file");
  const zone = $("dropzone");
  input.addEventListener("change", () => { if (input.files.length) onFile(model, input.files[0]); });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragging"); }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("dragging")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) onFile(model, event.dataTransfer.files[0]);
  });
  $("device-form").addEventListener("submit", (event) => event.preventDefault());
  const slider = $("opacity");
  slider.addEventListener("input", () => { $("overlay").style.opacity = String(slider.value / 100); });
  input.disabled = false;
  $("status").dataset.state = "ready";
  $("status").dataset.readyMs = String(Math.round(performance.now()));
  $("status").textContent = "Ready: the model runs in this browser.";
}

if (root) {
  const parameters = new URL(root.dataset.parameters, document.baseURI);
  loadModel(parameters, new URL(root.dataset.vendor, document.baseURI)).then(wire, unavailable);
}
