"""`archive` on Ray Data against `predict --csv`: images per second on the same files, with 1 and 2
actors, each command in its own interpreter as a user runs it (a local Ray started by the command,
or the cluster of --address).

    .venv/bin/python -m bench.benchmark_archive --files 2000 --out bench-results/
    .venv/bin/python -m bench.benchmark_archive --files 2000 --actors 4 8 --address auto   # on a cluster's head

Files: hard links to the real X-rays of tests/data (or to the images of --images), repeated to
--files. Reported: the wall time of each command (Ray's start and the actors' model loading
included) and, for `archive`, the pipeline's own images/s from DIR/summary.json (from the first
block read to the last one written), the peak memory per actor and how many nodes the actors ran
on (`predict` runs here, in one process, with --address too); the largest probability difference
between `archive --csv` and `predict --csv` (0 when they agree to the CSV's 6 decimals).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_files(folder: Path, count: int, originals: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        original = originals[index % len(originals)]
        os.link(original, folder / f"{index:06d}{original.suffix.lower()}")


def timed(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pneumonia", *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stderr.strip().splitlines()[-1]


def probabilities(path: Path) -> dict[str, float]:
    with path.open(newline="") as handle:
        return {row["path"]: float(row["probability"] or "nan") for row in csv.DictReader(handle)}


def bench(work: Path, files: int, actors: list[int], rows_per_file: int, address: str) -> dict:
    images = work / "images"
    seconds, line = timed(["predict", str(images), "--csv", str(work / "predict.csv")])
    result = {"files": files, "predict": {"seconds": round(seconds, 1), "images_per_s": round(files / seconds, 2)}}
    print(f"predict --csv: {seconds:.1f} s, {files / seconds:.1f} images/s  [{line}]", flush=True)
    expected = probabilities(work / "predict.csv")
    for count in actors:
        out, table = work / f"archive-{count}", work / f"archive-{count}.csv"
        command = ["archive", str(images), "--out", str(out), "--csv", str(table), "--actors", str(count)]
        seconds, line = timed([*command, "--rows-per-file", str(rows_per_file), "--address", address])
        summary = json.loads((out / "summary.json").read_text())
        got = probabilities(table)
        worst = max(abs(got[p] - expected[p]) for p in expected if expected[p] == expected[p])
        result[f"archive_{count}"] = {
            "seconds": round(seconds, 1),
            "images_per_s": round(files / seconds, 2),
            "pipeline_images_per_s": summary["images_per_second"],
            "peak_rss_mb_per_actor": [a["peak_rss_mb"] for a in summary["actors"].values()],
            "nodes": len({a["node"] for a in summary["actors"].values()}),
            "max_probability_difference": worst,
        }
        print(
            f"archive --actors {count}: {seconds:.1f} s, {files / seconds:.1f} images/s "
            f"(pipeline {summary['images_per_second']:.1f}), max |dp| {worst:.1e}  [{line}]",
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows-per-file", type=int, default=64)
    parser.add_argument("--images", type=Path, help="a folder of X-rays to repeat (default: tests/data)")
    parser.add_argument("--address", default="", help="archive's --address (default: a local Ray)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args(argv)
    folder = args.images or REPO / "tests" / "data"
    originals = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png", ".dcm"))
    with tempfile.TemporaryDirectory() as scratch:
        make_files(Path(scratch) / "images", args.files, originals)
        result = bench(Path(scratch), args.files, args.actors, args.rows_per_file, args.address)
    result["cpus"], result["load_average"] = os.cpu_count(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "archive.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
