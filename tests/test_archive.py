"""`python -m pneumonia archive` on a local Ray limited to 2 CPUs (started once for the module): the
rows equal `predict --csv`'s on the same files, a corrupt file is a row, manifests, a model the actors
cannot load, a resume after a run stopped part way, and (slow) the memory bound on a 20,000-image
manifest. Object storage: test_archive_s3.py; a cluster address: test_archive_cluster.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from builders import REAL_XRAYS, REPO, encode_image, local_ray_session, synthetic_xray, write_xray_folder

ray = pytest.importorskip("ray", reason="the archive extra (requirements-archive.txt) is not installed")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from pneumonia import cli  # noqa: E402
from pneumonia.archive.result_files import COLUMNS, part_files, read_results  # noqa: E402
from pneumonia.archive.sources import find_inputs  # noqa: E402
from pneumonia.cli.archive import actor_range  # noqa: E402
from pneumonia.serving.result_formats import DECIMALS  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one worker holds the module's Ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    with local_ray_session():
        yield


@pytest.fixture(scope="module")
def xray_folder(tmp_path_factory):
    """The two real X-rays, three copies, a truncated JPEG and a file that is no image."""
    folder = write_xray_folder(tmp_path_factory.mktemp("xrays"))
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    return folder


def archive(capsys, *args) -> tuple[int, str]:
    status = cli.main(["archive", *map(str, args)])
    return status, capsys.readouterr().err


def csv_rows(path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def parquet_rows(folder) -> list[dict]:
    return read_results(str(folder)).to_pylist()


def test_rows_equal_predict_csv_on_the_same_files_and_a_corrupt_file_is_a_row(xray_folder, tmp_path, capsys):
    assert cli.main(["predict", str(xray_folder), "--csv", str(tmp_path / "predict.csv")]) == 1
    predicted = csv_rows(tmp_path / "predict.csv")
    capsys.readouterr()
    status, err = archive(capsys, xray_folder, "--out", tmp_path / "out", "--csv", tmp_path / "archive.csv")
    assert status == 1  # as predict: a file could not be read
    wrote = f"wrote {tmp_path / 'out'} and {tmp_path / 'archive.csv'}"
    assert err.strip().splitlines()[-1] == f"7 file(s): 5 screened, 0 refused by the gate, 2 unreadable; {wrote}"
    rows = {row["path"]: row for row in parquet_rows(tmp_path / "out")}
    assert sorted(rows) == sorted(predicted)
    for path, expected in predicted.items():
        for column in COLUMNS[1:]:
            value = rows[path][column]
            if column in DECIMALS and expected[column]:
                assert abs(value - float(expected[column])) <= 10.0 ** -DECIMALS[column], (path, column)
            else:
                assert ("" if value is None else value) == expected[column], (path, column)
    assert rows[str(xray_folder / "corrupt.png")]["error"].endswith(
        "is not a supported image (JPEG, PNG, BMP, TIFF or DICOM)."
    )
    assert csv_rows(tmp_path / "archive.csv") == predicted  # --csv is predict's file, row for row
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["files"], summary["screened"], summary["failed"], summary["screened_now"]) == (7, 5, 2, 7)
    assert summary["images_per_second"] > 0 and all(a["peak_rss_mb"] > 0 for a in summary["actors"].values())
    assert [a["node"] for a in summary["actors"].values()] == [ray.get_runtime_context().get_node_id()]


def test_a_csv_and_a_parquet_manifest_give_their_path_column_once_each(xray_folder, tmp_path, capsys):
    files = sorted(str(p) for p in xray_folder.glob("*.jpeg"))[:3]
    missing, shared = str(tmp_path / "missing.jpeg"), f"file://{files[0]}"  # a file:// URI is read on any node
    (tmp_path / "a.csv").write_text("path,site\n" + "".join(f"{p},x\n" for p in [files[0], files[1], missing]))
    pq.write_table(pa.table({"path": [files[1], files[2], shared]}), tmp_path / "b.parquet")
    status, err = archive(capsys, tmp_path / "a.csv", tmp_path / "b.parquet", "--out", tmp_path / "out")
    assert status == 1
    rows = {row["path"]: row for row in parquet_rows(tmp_path / "out")}
    assert sorted(rows) == sorted([*files, missing, shared])  # files[1] twice in, once out
    assert rows[missing]["error"] == f"No such image file: {missing}"
    assert rows[shared]["probability"] == rows[files[0]]["probability"]
    assert "5 file(s): 4 screened, 0 refused by the gate, 1 unreadable" in err


def test_a_manifest_without_a_path_column_or_no_images_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("file\nx.jpeg\n")
    assert archive(capsys, tmp_path / "bad.csv", "--out", tmp_path / "out")[0] == 2
    (tmp_path / "empty").mkdir()
    status, err = archive(capsys, tmp_path / "empty", "--out", tmp_path / "out")
    assert status == 2 and "no image files" in err


def test_a_model_the_actors_cannot_load_stops_the_run_with_a_message(xray_folder, tmp_path, capsys):
    status, err = archive(capsys, xray_folder, "--out", tmp_path / "out", "--model", "no-such-model")
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "error: the run stopped: pneumonia.errors.ModelLoadError: No model folder or .keras file "
        f"{os.path.abspath('no-such-model')}: train a model with `python -m pneumonia train`."
    )  # resolved where the command runs: a cluster's workers have other working folders
    assert not part_files(str(tmp_path / "out"))[1]


def test_actors_take_a_count_or_an_autoscaling_range():
    assert actor_range("3") == (3, 3) and actor_range("1:4") == (1, 4)
    with pytest.raises(Exception, match="MIN <= MAX"):
        actor_range("4:1")


def test_a_resumed_run_screens_only_the_missing_blocks_and_no_file_twice(xray_folder, tmp_path, capsys):
    out = tmp_path / "out"
    archive(capsys, xray_folder, "--out", out, "--rows-per-file", 2)
    system, parts = part_files(str(out))
    assert len(parts) == 4  # 7 files in blocks of 2
    # a run stopped part way: two blocks never written, a third caught half-written under its temporary name
    lost = sum(pq.read_metadata(part).num_rows for part in parts[:2])
    for part in parts[:2]:
        os.remove(part)
    (out / ".tmp-0123-part-abc.parquet").write_bytes(b"PAR1 half a file")
    status, err = archive(capsys, xray_folder, "--out", out, "--rows-per-file", 2)
    assert status == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["already_done"], summary["screened_now"], summary["files"]) == (7 - lost, lost, 7)
    paths = [row["path"] for row in parquet_rows(out)]
    assert len(paths) == len(set(paths)) == 7
    assert not list(out.glob(".tmp-*"))
    # a third run has nothing left to screen and starts no actor
    archive(capsys, xray_folder, "--out", out)
    assert json.loads((out / "summary.json").read_text())["screened_now"] == 0


# --- slow: a real stop, and the memory bound on 20,000 images -----------------------------------


def write_many(folder, count: int, real_every: int = 100) -> list[str]:
    """`count` files: 64-px PNGs (the gate refuses them: rows all the same) and every `real_every`-th a
    hard link to a real X-ray (a model pass)."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny = encode_image(synthetic_xray(1, np.random.default_rng(0)), "PNG")
    paths = []
    for index in range(count):
        path = folder / f"{index:06d}.{'jpeg' if index % real_every == 0 else 'png'}"
        if index % real_every == 0:
            os.link(REAL_XRAYS[index // real_every % 2], path)
        else:
            path.write_bytes(tiny)
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_a_run_killed_part_way_resumes_without_duplicates(tmp_path, capsys):
    paths = write_many(tmp_path / "images", 1200, real_every=20)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pneumonia", "archive", str(tmp_path / "images"), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--rows-per-file", "50"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while len(part_files(str(out))[1]) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # its own local Ray goes with it
    process.wait()
    written = len(read_results(str(out), ["path"]))
    assert 0 < written < len(paths)
    archive(capsys, tmp_path / "images", "--out", out, "--rows-per-file", 50)
    found = read_results(str(out), ["path"]).column("path").to_pylist()
    assert sorted(found) == sorted(paths)


@pytest.mark.slow
def test_a_20000_image_manifest_keeps_each_actors_memory_bounded(tmp_path, capsys):
    paths = write_many(tmp_path / "images", 20_000)
    pq.write_table(pa.table({"path": paths}), tmp_path / "manifest.parquet")
    started = time.perf_counter()
    status, err = archive(
        capsys, tmp_path / "manifest.parquet", "--out", tmp_path / "out", "--actors", 2, "--rows-per-file", 256
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    print(f"\n20,000 images in {time.perf_counter() - started:.0f} s; actors: {json.dumps(summary['actors'])}")
    assert summary["files"] == summary["screened_now"] == 20_000
    assert summary["screened"] == 200  # the real X-rays; the tiny PNGs are refused by the gate
    for actor in summary["actors"].values():
        # no accumulation: after its first block an actor grows by less than a block's worth of images
        assert actor["peak_rss_mb"] - actor["first_block_peak_mb"] < 150, actor
        assert actor["peak_rss_mb"] < 1500, actor
    assert len(find_inputs([str(tmp_path / "manifest.parquet")]).paths) == 20_000
