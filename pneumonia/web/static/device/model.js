// The model's download: its parameters (model/screener.json, pneumonia/web/device_site.py), its files
// checked against the card's fingerprints, and an ONNX Runtime session on WebAssembly (`ort`, the
// vendored onnxruntime-web loaded by the page before this module).
import { gateArrays } from "./ood_checks.js";
import { sha256Hex } from "./hashing.js";
import { CONTRASTS } from "./pixels.js";

async function fetchChecked(url, expected) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url.pathname.split("/").pop()} could not be downloaded (HTTP ${response.status})`);
  const buffer = await response.arrayBuffer();
  if (expected && (await sha256Hex(buffer)) !== expected) {
    const name = url.pathname.split("/").pop();
    throw new Error(`${name} is not the file the model card records (its fingerprint differs): no screening with it`);
  }
  return buffer;
}

// `parameters`, `vendor`: the URLs of screener.json and of onnxruntime-web's folder.
export async function loadModel(parameters, vendor) {
  if (typeof WebAssembly !== "object" || typeof ort !== "object") {
    throw new Error("This browser cannot run the model here (it has no WebAssembly).");
  }
  const response = await fetch(parameters);
  if (!response.ok) throw new Error(`The model's parameters could not be downloaded (HTTP ${response.status})`);
  const params = await response.json();
  if (!CONTRASTS.includes(params.preprocessing.contrast)) {  // a newer card than this page: no guessing
    throw new Error(`This page cannot apply the model's contrast normalisation "${params.preprocessing.contrast}".`);
  }
  const { explain, weights } = params.files;
  const at = (name) => new URL(name, parameters);
  const downloads = [fetchChecked(at(explain.file), explain.sha256), fetchChecked(at(weights.file), weights.sha256)];
  if (params.gate) downloads.push(fetchChecked(at(params.gate.file), params.gate.sha256));
  const [graph, data, gate] = await Promise.all(downloads);
  ort.env.wasm.wasmPaths = vendor.href;
  // Threads need SharedArrayBuffer, which a browser gives only to a cross-origin-isolated page
  // (COOP/COEP headers: the app sends them; a static host must be told to).
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const session = await ort.InferenceSession.create(new Uint8Array(graph), {
    executionProviders: ["wasm"],
    externalData: [{ path: weights.file, data: new Uint8Array(data) }],
  });
  return { params, session, gate: gate ? gateArrays(gate, params.gate.feature_dim) : null };
}

// One square through the session: the outputs `scored` reads, as arrays.
export async function runModel(model, input) {
  const size = model.params.preprocessing.image_size;
  const tensor = new ort.Tensor("float32", input, [1, size, size, 3]);
  const outputs = await model.session.run({ [model.session.inputNames[0]]: tensor });
  return { logit: outputs.logit.data, cam: outputs.cam.data, features: outputs.features.data };
}
