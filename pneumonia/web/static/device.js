// The in-browser screener: the server's screening pipeline, step by step, on this device.
// Nothing here sends anything: the page's Content-Security-Policy (connect-src 'self') lets it fetch
// only its own files, and it fetches only the model, its parameters and ONNX Runtime's WebAssembly.
//
//   file ──readHeader (size checks before decoding)──> createImageBitmap ──> greyscale, PixelStats
//     ──pixel checks──> [JPEG: the server's DCT-scale draft, as a box mean] ──Pillow's bilinear resize──> (S, S)
//     ──card's contrast, normalisation──> explain.onnx (logit, Grad-CAM, features) ──gate, Platt, labels
//
// Each step names the Python it follows; model/screener.json (pneumonia/web/device_site.py) carries
// every number, so nothing model-specific is written here. tests/test_device.py checks it against `predict`.
"use strict";

(function () {
  const root = document.getElementById("device");
  if (!root) return;
  const $ = (id) => document.getElementById(id);

  class ReadError extends Error {}  // pneumonia.errors.XrayReadError: the server's 400 messages

  // --- sha256 ------------------------------------------------------------------------------------
  // crypto.subtle exists only in a secure context (https, localhost); an intranet share over plain
  // http is not one, so a plain implementation checks the fingerprints there.
  const K = new Uint32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
  ]);

  function sha256Plain(bytes) {
    const length = bytes.length;
    const padded = new Uint8Array(Math.ceil((length + 9) / 64) * 64);
    padded.set(bytes);
    padded[length] = 0x80;
    const view = new DataView(padded.buffer);
    view.setUint32(padded.length - 8, Math.floor(length / 0x20000000));
    view.setUint32(padded.length - 4, (length * 8) >>> 0);
    const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
    const w = new Uint32Array(64);
    const rotr = (x, n) => (x >>> n) | (x << (32 - n));
    for (let offset = 0; offset < padded.length; offset += 64) {
      for (let t = 0; t < 16; t++) w[t] = view.getUint32(offset + 4 * t);
      for (let t = 16; t < 64; t++) {
        const s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >>> 3);
        const s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >>> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
      }
      let [a, b, c, d, e, f, g, k] = h;
      for (let t = 0; t < 64; t++) {
        const t1 = k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[t] + w[t];
        const t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        [k, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
      }
      [a, b, c, d, e, f, g, k].forEach((value, i) => { h[i] = (h[i] + value) >>> 0; });
    }
    return Array.from(h, (x) => x.toString(16).padStart(8, "0")).join("");
  }

  async function sha256(buffer) {
    if (!(self.crypto && crypto.subtle)) return sha256Plain(new Uint8Array(buffer));
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buffer));
    return Array.from(digest, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  // --- loading -----------------------------------------------------------------------------------
  const base = new URL(root.dataset.parameters, document.baseURI);

  async function fetchChecked(name, expected) {
    const response = await fetch(new URL(name, base));
    if (!response.ok) throw new Error(`${name} could not be downloaded (HTTP ${response.status})`);
    const buffer = await response.arrayBuffer();
    if (expected && (await sha256(buffer)) !== expected) {
      throw new Error(`${name} is not the file the model card records (its fingerprint differs): no screening with it`);
    }
    return buffer;
  }

  async function loadModel() {
    if (typeof WebAssembly !== "object" || typeof ort !== "object") {
      throw new Error("This browser cannot run the model here (it has no WebAssembly).");
    }
    const response = await fetch(base);
    if (!response.ok) throw new Error(`The model's parameters could not be downloaded (HTTP ${response.status})`);
    const params = await response.json();
    if (!CONTRASTS.includes(params.preprocessing.contrast)) {  // a newer card than this page: no guessing
      throw new Error(`This page cannot apply the model's contrast normalisation "${params.preprocessing.contrast}".`);
    }
    const { explain, weights } = params.files;
    const downloads = [fetchChecked(explain.file, explain.sha256), fetchChecked(weights.file, weights.sha256)];
    if (params.gate) downloads.push(fetchChecked(params.gate.file, params.gate.sha256));
    const [graph, data, gate] = await Promise.all(downloads);
    ort.env.wasm.wasmPaths = new URL(root.dataset.vendor, document.baseURI).href;
    // Threads need SharedArrayBuffer, which a browser gives only to a cross-origin-isolated page
    // (COOP/COEP headers: the app sends them; a static host must be told to).
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const session = await ort.InferenceSession.create(new Uint8Array(graph), {
      executionProviders: ["wasm"],
      externalData: [{ path: weights.file, data: new Uint8Array(data) }],
    });
    return { params, session, gate: gate ? gateArrays(gate, params.gate.feature_dim) : null };
  }

  function gateArrays(buffer, dim) {  // device_site.gate_binary: means (2, d), then precision (d, d)
    const all = new Float32Array(buffer);
    return { means: [all.subarray(0, dim), all.subarray(dim, 2 * dim)], precision: all.subarray(2 * dim) };
  }

  // --- reading: reading/decoding.py --------------------------------------------------------------
  function readHeader(bytes, reading) {
    // The web app's answers before decoding (web/uploads.py: read_upload), then decoding._open_image's.
    if (bytes.length === 0) throw new ReadError("The uploaded file is empty.");
    const format = sniff(bytes);
    if (format === "JPEG") return checkSize(jpegHeader(bytes), reading);
    if (format === "PNG") return checkSize(pngHeader(bytes), reading);
    if (format) {
      throw new ReadError(`This page reads JPEG and PNG files; a ${format} file can be screened by the server mode.`);
    }
    throw new ReadError(`The upload is not a supported image type. Upload a ${reading.accepted_types} file.`);
  }

  function sniff(bytes) {  // decoding.IMAGE_SIGNATURES
    const starts = (offset, magic) => magic.every((byte, i) => bytes[offset + i] === byte);
    if (starts(0, [0xff, 0xd8, 0xff])) return "JPEG";
    if (starts(0, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return "PNG";
    if (starts(0, [0x42, 0x4d])) return "BMP";
    if (starts(0, [0x49, 0x49, 0x2a, 0x00]) || starts(0, [0x4d, 0x4d, 0x00, 0x2a])) return "TIFF";
    if (starts(128, [0x44, 0x49, 0x43, 0x4d])) return "DICOM";
    return null;
  }

  function jpegHeader(bytes) {
    // Walks the markers to the frame header (SOF0..SOF15 but DHT, JPG, DAC), as Pillow's opener does.
    let i = 2;
    while (i + 9 < bytes.length) {
      if (bytes[i] !== 0xff || bytes[i + 1] === 0xff) { i++; continue; }
      const marker = bytes[i + 1];
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        const frame = { format: "JPEG", height: (bytes[i + 5] << 8) | bytes[i + 6], width: (bytes[i + 7] << 8) | bytes[i + 8] };
        frame.colour = bytes[i + 9] >= 3;
        frame.complete = lastMarker(bytes, 0xd9) > i;  // an end-of-image marker after the frame
        return frame;
      }
      if (marker === 0xda) break;
      i += 2 + ((bytes[i + 2] << 8) | bytes[i + 3]);
    }
    throw new ReadError("the upload is not a supported image (JPEG, PNG, BMP, TIFF or DICOM).");
  }

  function lastMarker(bytes, marker) {
    for (let i = bytes.length - 2; i >= 0; i--) if (bytes[i] === 0xff && bytes[i + 1] === marker) return i;
    return -1;
  }

  function pngHeader(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (bytes.length < 33) throw new ReadError("the upload is not a supported image (JPEG, PNG, BMP, TIFF or DICOM).");
    const frame = { format: "PNG", width: view.getUint32(16), height: view.getUint32(20), depth: bytes[24] };
    frame.colour = [2, 3, 6].includes(bytes[25]);
    frame.complete = false;
    for (let offset = 8; offset + 8 <= bytes.length; offset += 12 + view.getUint32(offset)) {
      if (view.getUint32(offset + 4) === 0x49454e44) frame.complete = true;  // IEND
    }
    return frame;
  }

  function checkSize(frame, reading) {
    const { width, height } = frame;
    if (width * height > reading.pillow_max_image_pixels) {
      throw new ReadError("the upload declares too many pixels to be an X-ray; refused before decoding.");
    }
    if (width * height > reading.max_image_pixels) {
      const allowed = reading.max_image_pixels.toLocaleString("en-US");
      throw new ReadError(`the upload is ${width}x${height} pixels, more than the ${allowed} allowed; refused before decoding.`);
    }
    if (width < reading.min_side || height < reading.min_side) {
      throw new ReadError(`the upload is only ${width}x${height} pixels: too small to be an X-ray.`);
    }
    if (frame.depth === 16) {
      throw new ReadError("This page reads 8-bit images; a 16-bit PNG can be screened by the server mode.");
    }
    if (!frame.complete) throw new ReadError("The image is corrupt or truncated (its data ends early).");
    return frame;
  }

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

  function greyscale(rgba) {
    // Pillow's RGB -> L (L24: ITU-R 601-2 luma in 16-bit fixed point); transparent pixels over black,
    // as decoding._to_greyscale composites them.
    const grey = new Uint8Array(rgba.length / 4);
    for (let i = 0, p = 0; i < grey.length; i++, p += 4) {
      let r = rgba[p], g = rgba[p + 1], b = rgba[p + 2];
      const a = rgba[p + 3];
      if (a !== 255) {
        r = Math.round((r * a) / 255);
        g = Math.round((g * a) / 255);
        b = Math.round((b * a) / 255);
      }
      grey[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
    }
    return grey;
  }

  // --- pixel statistics: reading/pixel_stats.py --------------------------------------------------
  function sampleIndices(size, factor) {
    // Pillow's NEAREST resize to size // factor (ImagingScaleAffine: centres accumulated in doubles).
    const out = Math.max(1, Math.floor(size / factor));
    const step = size / out;
    const indices = new Int32Array(out);
    let position = step * 0.5;
    for (let i = 0; i < out; i++, position += step) indices[i] = Math.min(size - 1, Math.floor(position));
    return indices;
  }

  function sample(width, height, side, read) {
    const factor = Math.max(1, Math.floor(Math.max(width, height) / side));
    const xs = sampleIndices(width, factor);
    const ys = sampleIndices(height, factor);
    const values = [];
    for (const y of ys) for (const x of xs) values.push(read(y * width + x));
    return values;
  }

  function meanChroma(image, colour, side) {
    if (!colour) return 0;
    const rgba = image.rgba;
    const chroma = sample(image.width, image.height, side, (i) => {
      const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
      return Math.max(r, g, b) - Math.min(r, g, b);
    });
    return chroma.reduce((sum, c) => sum + c, 0) / chroma.length;
  }

  function greySpread(grey, width, height, side) {
    const histogram = new Float64Array(256);
    sample(width, height, side, (i) => grey[i]).forEach((v) => { histogram[v] += 1; });
    for (let i = 1; i < 256; i++) histogram[i] += histogram[i - 1];
    const total = histogram[255];
    const searchsorted = (value) => histogram.findIndex((c) => c >= value);
    return searchsorted(0.99 * total) - searchsorted(0.01 * total);
  }

  function draftScale(frame, reading, imageSize) {
    // decoding._draft: the smallest DCT scale that keeps both sides at least DRAFT_MARGIN x the model's side.
    if (frame.format !== "JPEG") return 1;
    const least = Math.max(reading.draft_margin * imageSize, reading.draft_min_side);
    return reading.draft_scales.find((s) => Math.floor(Math.min(frame.width, frame.height) / s) >= least) || 1;
  }

  function boxReduce(grey, width, height, scale) {
    // libjpeg's scaled IDCT gives about the mean of each scale x scale block (exactly, at 1/8: the DC term).
    const outWidth = Math.ceil(width / scale);
    const outHeight = Math.ceil(height / scale);
    const out = new Uint8Array(outWidth * outHeight);
    for (let oy = 0; oy < outHeight; oy++) {
      for (let ox = 0; ox < outWidth; ox++) {
        let sum = 0, count = 0;
        for (let y = oy * scale; y < Math.min(height, (oy + 1) * scale); y++) {
          for (let x = ox * scale; x < Math.min(width, (ox + 1) * scale); x++, count++) sum += grey[y * width + x];
        }
        out[oy * outWidth + ox] = Math.round(sum / count);
      }
    }
    return { grey: out, width: outWidth, height: outHeight };
  }

  // --- the model's square: serving/preprocessing.py ----------------------------------------------
  const CONTRASTS = ["none", "equalize"];  // serving/card.py: CONTRASTS, as modelInput applies them
  const PRECISION_BITS = 22;  // Pillow's Resample.c: 32 - 8 - 2

  function coefficients(inSize, outSize) {
    // Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear (triangle) filter: its support
    // widens with the downscale factor, which is the antialiasing.
    const scale = inSize / outSize;
    const filterScale = Math.max(scale, 1);
    const support = filterScale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const weights = new Int32Array(outSize * ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const xmin = Math.max(0, Math.trunc(center - support + 0.5));
      const count = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
      const raw = [];
      for (let x = 0; x < count; x++) raw.push(Math.max(0, 1 - Math.abs((x + xmin - center + 0.5) / filterScale)));
      const total = raw.reduce((sum, w) => sum + w, 0);
      raw.forEach((w, x) => { weights[xx * ksize + x] = Math.trunc(0.5 + (total !== 0 ? w / total : w) * (1 << PRECISION_BITS)); });
      bounds[2 * xx] = xmin;
      bounds[2 * xx + 1] = count;
    }
    return { bounds, weights, ksize };
  }

  function clip8(sum) {
    if (sum >= 1 << PRECISION_BITS << 8) return 255;
    return sum <= 0 ? 0 : sum >> PRECISION_BITS;
  }

  function resize(grey, width, height, size) {
    // Image.resize((S, S), BILINEAR) on an "L" image: a horizontal pass into 8 bits, then a vertical one.
    const h = coefficients(width, size);
    const v = coefficients(height, size);
    const rows = new Uint8Array(size * height);
    for (let y = 0; y < height; y++) {
      for (let xx = 0; xx < size; xx++) {
        let sum = 1 << (PRECISION_BITS - 1);
        const [xmin, count] = [h.bounds[2 * xx], h.bounds[2 * xx + 1]];
        for (let x = 0; x < count; x++) sum += grey[y * width + xmin + x] * h.weights[xx * h.ksize + x];
        rows[y * size + xx] = clip8(sum);
      }
    }
    const square = new Uint8Array(size * size);
    for (let yy = 0; yy < size; yy++) {
      const [ymin, count] = [v.bounds[2 * yy], v.bounds[2 * yy + 1]];
      for (let xx = 0; xx < size; xx++) {
        let sum = 1 << (PRECISION_BITS - 1);
        for (let y = 0; y < count; y++) sum += rows[(ymin + y) * size + xx] * v.weights[yy * v.ksize + y];
        square[yy * size + xx] = clip8(sum);
      }
    }
    return square;
  }

  function roundHalfEven(x) {  // OpenCV's cvRound (saturate_cast<uchar> of a float)
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
  }

  function equalize(pixels) {
    // cv2.equalizeHist: the cumulative histogram from the first non-empty bin, scaled in float32.
    const histogram = new Int32Array(256);
    pixels.forEach((v) => { histogram[v]++; });
    let first = 0;
    while (!histogram[first]) first++;
    if (histogram[first] === pixels.length) return new Uint8Array(pixels.length).fill(first);
    const scale = Math.fround(255 / (pixels.length - histogram[first]));
    const lut = new Uint8Array(256);
    for (let i = first + 1, sum = 0; i < 256; i++) {
      sum += histogram[i];
      lut[i] = Math.min(255, roundHalfEven(Math.fround(sum * scale)));
    }
    return pixels.map((v) => lut[v]);
  }

  function modelInput(square, preprocessing) {
    // normalize_contrast, then normalize: (x * scale - mean) / std in float32, replicated to 3 channels.
    const pixels = preprocessing.contrast === "equalize" ? equalize(square) : square;
    const { scale, mean, std } = preprocessing.normalization;
    const f = Math.fround;
    const input = new Float32Array(pixels.length * 3);
    pixels.forEach((v, i) => {
      for (let c = 0; c < 3; c++) input[3 * i + c] = f(f(f(v * f(scale)) - f(mean[c])) / f(std[c]));
    });
    return input;
  }

  // --- the gate: serving/gate.py -----------------------------------------------------------------
  function pixelVerdict(stats, bounds) {
    const checks = [
      ["size", stats.pixels < bounds.min_pixels, stats.pixels, bounds.min_pixels],
      ["shape", stats.aspect > bounds.max_aspect, stats.aspect, bounds.max_aspect],
      ["colour", stats.chroma > bounds.max_chroma, stats.chroma, bounds.max_chroma],
      ["blank", stats.spread < bounds.min_spread, stats.spread, bounds.min_spread],
    ];
    const failed = checks.find((check) => check[1]);
    return failed ? { verdict: "rejected", reason: failed[0], score: failed[2], threshold: failed[3] } : null;
  }

  function mahalanobis(features, gate) {
    // FeatureDensity.distance: to the nearer class mean, with the shared precision matrix.
    const dim = features.length;
    const squared = gate.means.map((mean) => {
      const centred = Float64Array.from(features, (x, i) => x - mean[i]);
      let total = 0;
      for (let r = 0; r < dim; r++) {
        let row = 0;
        for (let c = 0; c < dim; c++) row += gate.precision[r * dim + c] * centred[c];
        total += row * centred[r];
      }
      return total;
    });
    return Math.sqrt(Math.max(Math.min(...squared), 0));
  }

  function featureVerdict(score, thresholds) {
    if (score > thresholds.rejected) return { verdict: "rejected", reason: "features", score, threshold: thresholds.rejected };
    return { verdict: score > thresholds.unusual ? "unusual" : "ok", score };
  }

  // --- one file ----------------------------------------------------------------------------------
  async function screen(model, file) {
    const { params } = model;
    const timing = { started: performance.now() };
    const frame = readHeader(new Uint8Array(await file.arrayBuffer()), params.reading);
    const image = await decode(file);
    const grey = greyscale(image.rgba);
    const side = params.reading.stats_sample_side;
    const stats = { pixels: frame.width * frame.height, chroma: meanChroma(image, frame.colour, side) };
    stats.aspect = Math.max(frame.width, frame.height) / Math.max(1, Math.min(frame.width, frame.height));
    const size = params.preprocessing.image_size;
    const draft = draftScale(frame, params.reading, size);
    const reduced = draft > 1 ? boxReduce(grey, image.width, image.height, draft) : { grey, width: image.width, height: image.height };
    stats.spread = greySpread(reduced.grey, reduced.width, reduced.height, side);
    showImage(image.canvas, grey, params.overlay.display_max_side);
    timing.decode = performance.now();
    const refused = params.gate ? pixelVerdict(stats, params.gate.bounds) : null;
    if (refused) return { verdict: refused, timing };
    const square = resize(reduced.grey, reduced.width, reduced.height, size);
    const input = new ort.Tensor("float32", modelInput(square, params.preprocessing), [1, size, size, 3]);
    const outputs = await model.session.run({ [model.session.inputNames[0]]: input });
    timing.model = performance.now();
    return scored(model, outputs, timing);
  }

  function scored(model, outputs, timing) {
    const { params } = model;
    const verdict = model.gate ? featureVerdict(mahalanobis(outputs.features.data, model.gate), params.gate.thresholds) : null;
    if (verdict && verdict.verdict === "rejected") return { verdict, timing };
    const { slope, intercept } = params.calibration;
    const probability = 1 / (1 + Math.exp(-(slope * outputs.logit.data[0] + intercept)));  // card.platt
    const labels = {};
    for (const [name, threshold] of Object.entries(params.thresholds)) labels[name] = probability >= threshold ? "PNEUMONIA" : "NORMAL";
    const forPneumonia = labels.default === "PNEUMONIA";
    // gradcam.heatmap: ReLU of the signed map (negated for NORMAL), over its maximum
    const evidence = Array.from(outputs.cam.data, (c) => Math.max(forPneumonia ? c : -c, 0));
    const peak = Math.max(...evidence);
    const heat = evidence.map((e) => e / (peak + params.gradcam.epsilon));
    return { verdict, probability, labels, heat, localised: peak > 0, timing };
  }

  // --- the page ----------------------------------------------------------------------------------
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
    result.dataset.verdict = outcome.probability === undefined ? "refused" : "screened";
    const t = outcome.timing;
    result.dataset.ms = String(Math.round(performance.now() - t.started));
    result.dataset.decodeMs = t.decode ? String(Math.round(t.decode - t.started)) : "";
    result.dataset.modelMs = t.model ? String(Math.round(t.model - t.decode)) : "";
    if (outcome.error) {
      result.dataset.reason = "unreadable";
      $("error-message").textContent = outcome.error;
      $("read-error").hidden = false;
    } else if (outcome.probability === undefined) {
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
    $("ood-warning").hidden = !(outcome.verdict && outcome.verdict.verdict === "unusual");
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
      outcome = { error: message, timing: { started: performance.now() } };
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

  loadModel().then(wire, unavailable);
})();
