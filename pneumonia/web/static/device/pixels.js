// The pixels' way to the model (reading/decoding.py, serving/preprocessing.py): Pillow's greyscale
// conversion, the server's DCT-scale draft, Pillow's bilinear resize and OpenCV's histogram
// equalisation, ported integer for integer.

export const CONTRASTS = ["none", "equalize"];  // serving/card.py: CONTRASTS, as modelInput applies them
const PRECISION_BITS = 22;  // Pillow's Resample.c: 32 - 8 - 2

export function greyscale(rgba) {
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

export function draftScale(frame, reading, imageSize) {
  // decoding._draft: the smallest DCT scale that keeps both sides at least DRAFT_MARGIN x the model's side.
  if (frame.format !== "JPEG") return 1;
  const least = Math.max(reading.draft_margin * imageSize, reading.draft_min_side);
  return reading.draft_scales.find((s) => Math.floor(Math.min(frame.width, frame.height) / s) >= least) || 1;
}

export function roundHalfEven(x) {  // OpenCV's cvRound (saturate_cast<uchar> of a float); numpy's round
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

export function boxReduce(grey, width, height, scale) {
  // libjpeg's scaled IDCT (jidctred.c) is the mean of each scale x scale block of the full decode,
  // taken before rounding. The browser has only the rounded pixels: their mean ties at .5 in a
  // quarter of the 2 x 2 blocks, and rounding those up brightened the image by 1/8 of a grey level,
  // enough to move a probability by 0.006 (docs/browser.md, "Parity"); ties go to even instead.
  const outWidth = Math.ceil(width / scale);
  const outHeight = Math.ceil(height / scale);
  const out = new Uint8Array(outWidth * outHeight);
  for (let oy = 0; oy < outHeight; oy++) {
    for (let ox = 0; ox < outWidth; ox++) {
      let sum = 0, count = 0;
      for (let y = oy * scale; y < Math.min(height, (oy + 1) * scale); y++) {
        for (let x = ox * scale; x < Math.min(width, (ox + 1) * scale); x++, count++) sum += grey[y * width + x];
      }
      out[oy * outWidth + ox] = roundHalfEven(sum / count);
    }
  }
  return { grey: out, width: outWidth, height: outHeight };
}

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

export function resize(grey, width, height, size) {
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

export function equalize(pixels) {
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

export function modelInput(square, preprocessing) {
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
