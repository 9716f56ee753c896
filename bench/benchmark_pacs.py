"""`pacs screen` against a local Orthanc: images per second including the PACS round trips (QIDO-RS
to find, WADO-RS to fetch, the screening with the gate and Grad-CAM, STOW-RS of the Secondary Capture
and the SR), and where the time goes.

    .venv/bin/python -m bench.benchmark_pacs --images 100 --out bench-results/

Images: synthetic CR studies of --per-study images each, the real X-rays of tests/data (or of
--xrays) wrapped in DICOM, stored over STOW-RS into a fresh Orthanc with its DICOMweb plugin
(pneumonia/pacs/local_orthanc.py: apt-get install orthanc orthanc-dicomweb). Two runs over them:

  1. `python -m pneumonia pacs screen URL --csv FILE` in its own interpreter, as a user runs it: its
     wall time (the model's loading included) and images/s;
  2. the same work in this process with --force (nothing is skipped, so no done-check either), over a
     client that times its calls: the wall time split into search (QIDO-RS, result metadata), fetch
     (WADO-RS), results (building the SR and the capture with highdicom), store (STOW-RS) and screen
     (the rest: decoding, gate, model and Grad-CAM), and images/s with the model already loaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumonia.pacs.dicomweb import Connection, DicomWeb
from pneumonia.pacs.local_orthanc import orthanc_server
from pneumonia.pacs.runs import Filters, PacsScreener
from pneumonia.serving.outcomes import Outcome

REPO = Path(__file__).resolve().parent.parent
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def cr_image(pixels: np.ndarray, study: str, series: str, number: int) -> Dataset:
    """`pixels` (uint8 greyscale) as a CR image of `study`, with a synthetic patient."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR_IMAGE_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, number
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.Modality = "Bench^Synthetic", "BENCH", "20240301", "CR"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def store_studies(url: str, xrays: list[Path], images: int, per_study: int) -> None:
    """`images` CR images in studies of `per_study`, cycling through `xrays`, one STOW-RS per study."""
    pixels = [np.asarray(Image.open(path).convert("L")) for path in xrays]
    pacs = DicomWeb(Connection(url))
    for first in range(0, images, per_study):
        study, series = generate_uid(), generate_uid()
        count = min(per_study, images - first)
        pacs.store(study, [cr_image(pixels[(first + i) % len(pixels)], study, series, i + 1) for i in range(count)])
    pacs.close()


class TimedDicomWeb(DicomWeb):
    """A DicomWeb that adds the seconds of each call to `seconds[search | fetch | store]`."""

    def __init__(self, connection: Connection):
        super().__init__(connection)
        self.seconds = dict.fromkeys(("search", "fetch", "store"), 0.0)

    def _timed(self, kind: str, call, *args):
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds[kind] += time.perf_counter() - started

    def search_instances(self, *args):
        return self._timed("search", lambda: list(super(TimedDicomWeb, self).search_instances(*args)))

    def search_series(self, *args):
        return self._timed("search", lambda: list(super(TimedDicomWeb, self).search_series(*args)))

    def series_metadata(self, *args):
        return self._timed("search", super().series_metadata, *args)

    def retrieve_instance(self, *args):
        return self._timed("fetch", super().retrieve_instance, *args)

    def store(self, *args):
        return self._timed("store", super().store, *args)


class TimedScreener(PacsScreener):
    """A PacsScreener that adds the seconds of building and storing each image's results to `storing_s`."""

    storing_s = 0.0

    def _store(self, *args):
        started = time.perf_counter()
        try:
            return super()._store(*args)
        finally:
            self.storing_s += time.perf_counter() - started


def cli_run(url: str, csv_path: Path) -> dict:
    """`pacs screen URL` as a user runs it: wall seconds, images/s, the rows' statuses."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "pneumonia", "pacs", "screen", url, "--csv", str(csv_path)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pacs screen failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with csv_path.open(newline="") as handle:
        statuses = Counter(row["status"] for row in csv.DictReader(handle))
    screened = statuses[Outcome.SCREENED]
    return {"seconds": round(seconds, 1), "images_per_s": round(screened / seconds, 2), "statuses": dict(statuses)}


def timed_run(url: str) -> dict:
    """The same run in this process with --force, over TimedDicomWeb: images/s and the split."""
    from pneumonia.serving.classifier import XrayClassifier

    pacs = TimedDicomWeb(Connection(url))
    screener = TimedScreener(pacs, XrayClassifier(REPO / "model"), force=True)
    started = time.perf_counter()
    statuses = Counter(row.status for row in screener.run(Filters()))
    seconds = time.perf_counter() - started
    pacs.close()
    results = screener.storing_s - pacs.seconds["store"]  # building the SR and the capture
    split = {**pacs.seconds, "results": results, "screen": seconds - sum(pacs.seconds.values()) - results}
    return {
        "seconds": round(seconds, 1),
        "images_per_s": round(statuses[Outcome.SCREENED] / seconds, 2),
        "statuses": dict(statuses),
        "split_s": {kind: round(value, 1) for kind, value in split.items()},
        "split_share": {kind: round(value / seconds, 3) for kind, value in split.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="CR images to store and screen (default 100)")
    parser.add_argument("--per-study", type=int, default=2, help="images per study (default 2: PA and lateral)")
    parser.add_argument("--xrays", type=Path, default=REPO / "tests" / "data", help="a folder of X-rays to repeat")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args(argv)
    xrays = sorted(p for p in args.xrays.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    with tempfile.TemporaryDirectory() as scratch, orthanc_server(Path(scratch)) as url:
        started = time.perf_counter()
        store_studies(url, xrays, args.images, args.per_study)
        result = {
            "images": args.images,
            "per_study": args.per_study,
            "stored_s": round(time.perf_counter() - started, 1),
        }
        print(f"stored {args.images} images in {result['stored_s']} s", flush=True)
        result["pacs_screen"] = cli_run(url, Path(scratch) / "run.csv")
        print(f"pacs screen: {result['pacs_screen']}", flush=True)
        result["in_process_force"] = timed_run(url)
        print(f"in process, --force: {result['in_process_force']}", flush=True)
    result["cpus"], result["load_average"] = os.cpu_count(), [round(load, 1) for load in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pacs.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
