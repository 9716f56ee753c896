// What the gate's pixel checks measure (reading/pixel_stats.py): the colour before the greyscale
// conversion and the grey-level spread after it, on a nearest-neighbour sample as Pillow takes it.

function sampleIndices(size, factor) {
  // Pillow's NEAREST resize to size // factor (ImagingScaleAffine: centres accumulated in doubles).
  const out = Math.max(1, Math.floor(size / factor));
  const step = size / out;
  const indices = new Int32Array(out);
  let position = step * 0.5;
  for (let i = 0; i < out; i++, position += step) indices[i] = Math.min(size - 1, Math.floor(position));
  return indices;
}

function sample(width, height, side, read) {  // pixel_stats._sample
  const factor = Math.max(1, Math.floor(Math.max(width, height) / side));
  const xs = sampleIndices(width, factor);
  const ys = sampleIndices(height, factor);
  const values = [];
  for (const y of ys) for (const x of xs) values.push(read(y * width + x));
  return values;
}

// pixel_stats.mean_chroma: mean (max - min) over R, G, B; 0 for a greyscale file.
export function meanChroma(image, colour, side) {
  if (!colour) return 0;
  const rgba = image.rgba;
  const chroma = sample(image.width, image.height, side, (i) => {
    const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
    return Math.max(r, g, b) - Math.min(r, g, b);
  });
  return chroma.reduce((sum, c) => sum + c, 0) / chroma.length;
}

// pixel_stats.grey_spread: 99th minus 1st percentile of the grey levels, from the histogram.
export function greySpread(grey, width, height, side) {
  const histogram = new Float64Array(256);
  sample(width, height, side, (i) => grey[i]).forEach((v) => { histogram[v] += 1; });
  for (let i = 1; i < 256; i++) histogram[i] += histogram[i - 1];
  const total = histogram[255];
  const searchsorted = (value) => histogram.findIndex((c) => c >= value);
  return searchsorted(0.99 * total) - searchsorted(0.01 * total);
}
