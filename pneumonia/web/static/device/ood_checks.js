// The out-of-distribution gate (serving/gate.py): the pixel checks before the model, the Mahalanobis
// distance of the model's features after it.
import { GateVerdict } from "./vocabulary.js";

// gate.pixel_verdict: the first failed check, or null when every one passes.
export function pixelVerdict(stats, bounds) {
  const checks = [
    ["size", stats.pixels < bounds.min_pixels, stats.pixels, bounds.min_pixels],
    ["shape", stats.aspect > bounds.max_aspect, stats.aspect, bounds.max_aspect],
    ["colour", stats.chroma > bounds.max_chroma, stats.chroma, bounds.max_chroma],
    ["blank", stats.spread < bounds.min_spread, stats.spread, bounds.min_spread],
  ];
  const failed = checks.find((check) => check[1]);
  return failed ? { verdict: GateVerdict.REJECTED, reason: failed[0], score: failed[2], threshold: failed[3] } : null;
}

// device_site.gate_binary: the class means (2, d), then the precision (d, d), float32.
export function gateArrays(buffer, dim) {
  const all = new Float32Array(buffer);
  return { means: [all.subarray(0, dim), all.subarray(dim, 2 * dim)], precision: all.subarray(2 * dim) };
}

// FeatureDensity.distance: to the nearer class mean, with the shared precision matrix.
export function mahalanobis(features, gate) {
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

// OodGate.check_score
export function featureVerdict(score, thresholds) {
  if (score > thresholds.rejected) {
    return { verdict: GateVerdict.REJECTED, reason: "features", score, threshold: thresholds.rejected };
  }
  return { verdict: score > thresholds.unusual ? GateVerdict.UNUSUAL : GateVerdict.OK, score };
}
