// Runs exports of the in-browser screener's modules (pneumonia/web/static/device/) in node, for
// tests/test_device_modules.py. Reads JSON from stdin: [{module, name, args, pick}], and writes one
// JSON answer a call: {value} or {error: {name, message}}. An argument {"$file": path} is the file's
// bytes (a Uint8Array); typed arrays in answers become plain arrays; `pick` keeps those keys of an object.
import { readFileSync } from "node:fs";

const folder = new URL("../../pneumonia/web/static/device/", import.meta.url);

function argument(value) {
  if (Array.isArray(value)) return value.map(argument);
  if (value === null || typeof value !== "object") return value;
  if ("$file" in value) return new Uint8Array(readFileSync(value.$file));
  return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, argument(item)]));
}

function plain(key, value) {
  return ArrayBuffer.isView(value) ? Array.from(value) : value;
}

async function call({ module, name, args = [], pick }) {
  const exported = (await import(new URL(module, folder)))[name];
  try {
    let value = typeof exported === "function" ? await exported(...args.map(argument)) : exported;
    if (pick) value = Object.fromEntries(pick.map((key) => [key, value[key]]));
    return { value };
  } catch (err) {
    return { error: { name: err.constructor.name, message: err.message } };
  }
}

const calls = JSON.parse(readFileSync(0, "utf8"));
const answers = [];
for (const request of calls) answers.push(await call(request));
process.stdout.write(JSON.stringify(answers, plain));
