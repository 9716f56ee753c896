// The screening pipeline without the page: decoded pixels in, the model's input out (`prepare`);
// the model's outputs in, the outcome out (`scored`). The page decodes and runs the model between them;
// tests/test_device_modules.py runs these in node against the Python pipeline.
import { featureVerdict, mahalanobis, pixelVerdict } from "./ood_checks.js";
import { boxReduce, draftScale, greyscale, modelInput, resize } from "./pixels.js";
import { greySpread, meanChroma } from "./stats.js";
import { GateVerdict, Outcome } from "./vocabulary.js";

// `frame`: readHeader's; `image`: {width, height, rgba} decoded upright. What the server's decode_xray
// and prepare_xray give: the pixel statistics, the greyscale image (the display copy's source) and,
// unless the pixel checks refuse it, the model's square and its float32 input.
export function prepare(frame, image, params) {
  const grey = greyscale(image.rgba);
  const side = params.reading.stats_sample_side;
  const stats = { pixels: frame.width * frame.height, chroma: meanChroma(image, frame.colour, side) };
  stats.aspect = Math.max(frame.width, frame.height) / Math.max(1, Math.min(frame.width, frame.height));
  const size = params.preprocessing.image_size;
  const draft = draftScale(frame, params.reading, size);
  const reduced = draft > 1 ? boxReduce(grey, image.width, image.height, draft) : { grey, width: image.width, height: image.height };
  stats.spread = greySpread(reduced.grey, reduced.width, reduced.height, side);
  const refusal = params.gate ? pixelVerdict(stats, params.gate.bounds) : null;
  if (refusal) return { grey, stats, refusal };
  const square = resize(reduced.grey, reduced.width, reduced.height, size);
  return { grey, stats, square, input: modelInput(square, params.preprocessing) };
}

// The model's outputs ({logit, cam, features}: arrays) to the outcome: the gate's feature check, Platt
// calibration, the labels at each threshold and the Grad-CAM map. `gate`: gateArrays, or null.
export function scored(params, gate, outputs) {
  const verdict = gate ? featureVerdict(mahalanobis(outputs.features, gate), params.gate.thresholds) : null;
  if (verdict && verdict.verdict === GateVerdict.REJECTED) return { outcome: Outcome.REFUSED, verdict };
  const { slope, intercept } = params.calibration;
  const probability = 1 / (1 + Math.exp(-(slope * outputs.logit[0] + intercept)));  // card.platt
  const labels = {};
  for (const [name, threshold] of Object.entries(params.thresholds)) labels[name] = probability >= threshold ? "PNEUMONIA" : "NORMAL";
  const forPneumonia = labels.default === "PNEUMONIA";
  // gradcam.heatmap: ReLU of the signed map (negated for NORMAL), over its maximum
  const evidence = Array.from(outputs.cam, (c) => Math.max(forPneumonia ? c : -c, 0));
  const peak = Math.max(...evidence);
  const heat = evidence.map((e) => e / (peak + params.gradcam.epsilon));
  return { outcome: Outcome.SCREENED, verdict, probability, labels, heat, localised: peak > 0 };
}
