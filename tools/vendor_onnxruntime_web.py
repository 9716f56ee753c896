"""Fetches onnxruntime-web from npm at the pinned version and copies the few files the in-browser
screener loads into pneumonia/web/static/vendor/, with a manifest of their sha256.

    .venv/bin/python -m tools.vendor_onnxruntime_web

Committed rather than built at install time, so `pip install .`, the wheel's `export-web` and the
app need no node (issue 31). `npm pack` checks the tarball against the registry's integrity hash;
tests/test_device.py checks the committed files against the manifest and the manifest against PIN.
Only the WebAssembly build is taken (ort.wasm.min.js, 54 kB, and its 15 MB .wasm): the WebGPU build
(jsep, 30 MB) would double what every page load downloads, for a model that runs in ~1 s on WASM.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE, PIN = "onnxruntime-web", "1.31.1"
VENDOR = Path(__file__).resolve().parent.parent / "pneumonia" / "web" / "static" / "vendor"
FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
MANIFEST = "onnxruntime-web.json"
# The npm package declares "license": "MIT" but carries no LICENSE file: this is the text of
# https://github.com/microsoft/onnxruntime/blob/main/LICENSE, which the package's MIT refers to.
LICENSE = """MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(folder: Path) -> dict:
    """npm pack PACKAGE@PIN into `folder` (npm verifies its integrity) and unpack it; npm's own record of it."""
    packed = subprocess.run(
        ["npm", "pack", f"{PACKAGE}@{PIN}", "--json", "--pack-destination", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    [record] = json.loads(packed.stdout)
    with tarfile.open(folder / record["filename"]) as archive:
        archive.extractall(folder, filter="data")
    return record


def main() -> None:
    VENDOR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        record = fetch(Path(temporary))
        for name in FILES:
            (VENDOR / name).write_bytes((Path(temporary) / "package" / "dist" / name).read_bytes())
    (VENDOR / "onnxruntime-web.LICENSE").write_text(LICENSE)
    manifest = {
        "package": PACKAGE,
        "version": PIN,
        "integrity": record["integrity"],
        "files": {name: sha256(VENDOR / name) for name in FILES},
    }
    (VENDOR / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
