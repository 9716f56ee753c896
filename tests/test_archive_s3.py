"""`python -m pneumonia archive` on object storage: a moto S3 server on a loopback port holds the
X-rays, the manifest and the results. The AWS_* variables point pyarrow at it as they would at MinIO
or a cloud endpoint (`FileSystem.from_uri` reads AWS_ENDPOINT_URL), and the module's local Ray (2 CPUs)
starts after they are set, so its workers read the same endpoint. The rows equal `predict --csv`'s, a
missing object is a row, a run resumes over an s3:// DIR, and an endpoint that does not answer is a
row for an image, a message for the manifest or DIR."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import socket

import pytest
from builders import REAL_XRAYS, local_ray_session, write_xray_folder

ray = pytest.importorskip("ray", reason="the archive extra (requirements-archive.txt) is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (requirements-dev.txt) is not installed")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402
from pyarrow import fs  # noqa: E402

from pneumonia import cli  # noqa: E402
from pneumonia.archive.result_files import COLUMNS, read_results  # noqa: E402
from pneumonia.serving.result_formats import DECIMALS  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one worker holds a Ray at a time

BUCKET = "archive"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# one URI can name its own endpoint: this one names a port nothing listens on
UNREACHABLE = f"s3://{BUCKET}/xrays/copy-0.jpeg?endpoint_override=127.0.0.1:{closed_port()}&scheme=http"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a loopback port, and the environment that points pyarrow at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's one line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            **DUMMY_CREDENTIALS,
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # no credentials lookup on a cloud VM's metadata service
        }.items():
            env.setenv(name, value)
        yield env
    server.stop()


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    """The two real X-rays, three copies and a truncated JPEG under s3://archive/xrays/ (their local
    copies for `predict`), a text file and a hidden one beside them, and a Parquet manifest of the
    images, of an object that is not there and of one behind an endpoint that does not answer."""
    system, _ = fs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
    system.create_dir(BUCKET)
    local = write_xray_folder(tmp_path_factory.mktemp("s3-xrays"))
    for path in local.iterdir():
        put(system, f"{BUCKET}/xrays/{path.name}", path.read_bytes())
    put(system, f"{BUCKET}/xrays/notes.txt", b"not an image")
    put(system, f"{BUCKET}/xrays/.hidden/x.jpeg", b"hidden")
    images = sorted(f"s3://{BUCKET}/xrays/{path.name}" for path in local.iterdir())
    manifest = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": [*images, f"s3://{BUCKET}/xrays/missing.jpeg", UNREACHABLE]}), manifest)
    put(system, f"{BUCKET}/manifest.parquet", manifest.getvalue().to_pybytes())
    return system, local


def put(system, path: str, content: bytes) -> None:
    with system.open_output_stream(path) as stream:
        stream.write(content)


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    with local_ray_session():
        yield


def archive(capsys, *args) -> tuple[int, str]:
    status = cli.main(["archive", *map(str, args)])
    return status, capsys.readouterr().err


def by_name(rows) -> dict[str, dict]:
    return {row["path"].rsplit("/", 1)[-1]: row for row in rows}


def assert_rows_equal_predict(rows: dict[str, dict], predicted: dict[str, dict]) -> None:
    for name, expected in predicted.items():
        for column in COLUMNS[1:]:
            value = rows[name][column]
            if column == "error" and expected[column]:
                assert value.split("/")[-1] == expected[column].split("/")[-1], name  # the name in the message
            elif column in DECIMALS and expected[column]:
                assert abs(value - float(expected[column])) <= 10.0 ** -DECIMALS[column], (name, column)
            else:
                assert ("" if value is None else value) == expected[column], (name, column)


def test_an_s3_manifest_gives_predict_csv_rows_under_an_s3_out_and_resumes_there(bucket, local_ray, tmp_path, capsys):
    system, local = bucket
    assert cli.main(["predict", str(local), "--csv", str(tmp_path / "predict.csv")]) == 1
    with open(tmp_path / "predict.csv", newline="", encoding="utf-8") as handle:
        predicted = by_name(csv.DictReader(handle))
    capsys.readouterr()
    out, manifest = f"s3://{BUCKET}/results", f"s3://{BUCKET}/manifest.parquet"
    status, err = archive(capsys, manifest, "--out", out, "--rows-per-file", 2, "--csv", tmp_path / "archive.csv")
    assert status == 1  # a truncated JPEG, a missing object, an endpoint that does not answer
    assert "8 file(s): 5 screened, 0 refused by the gate, 3 unreadable" in err.strip().splitlines()[-1]
    rows = by_name(read_results(out).to_pylist())
    assert rows.pop("missing.jpeg")["error"] == f"No such image file: s3://{BUCKET}/xrays/missing.jpeg"
    unreachable = rows.pop(UNREACHABLE.rsplit("/", 1)[-1])["error"]
    assert unreachable.startswith(f"{UNREACHABLE} could not be read: ") and "NETWORK_CONNECTION" in unreachable
    assert sorted(rows) == sorted(predicted)
    assert_rows_equal_predict(rows, predicted)
    with system.open_input_stream(f"{BUCKET}/results/summary.json") as stream:
        summary = json.loads(stream.read())
    assert (summary["files"], summary["screened"], summary["failed"], summary["screened_now"]) == (8, 5, 3, 8)
    # stopped part way: two blocks never written, a third caught half-written under its temporary name
    parts = sorted(i.path for i in system.get_file_info(fs.FileSelector(f"{BUCKET}/results")) if "part-" in i.path)
    assert len(parts) == 4  # 8 files in blocks of 2
    lost = sum(pq.read_metadata(part, filesystem=system).num_rows for part in parts[:2])
    for part in parts[:2]:
        system.delete_file(part)
    put(system, f"{BUCKET}/results/.tmp-0123-part-abc.parquet", b"PAR1 half a file")
    status, err = archive(capsys, manifest, "--out", out, "--rows-per-file", 2)
    assert status == 1 and f"note: {8 - lost} file(s) were already screened" in err
    paths = read_results(out, ["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 8
    assert not [i for i in system.get_file_info(fs.FileSelector(f"{BUCKET}/results")) if ".tmp-" in i.path]
    with open(tmp_path / "archive.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 8  # --csv from the Parquet on S3


def test_a_folder_on_s3_is_searched_by_file_name_into_a_local_out(bucket, local_ray, tmp_path, capsys):
    status, err = archive(capsys, f"s3://{BUCKET}/xrays/", "--out", tmp_path / "out")
    assert status == 1  # the truncated JPEG
    assert "note: skipped 1 file(s) that are not images, e.g. s3://archive/xrays/notes.txt" in err
    rows = by_name(read_results(str(tmp_path / "out")).to_pylist())
    assert sorted(rows) == sorted(
        ["copy-0.jpeg", "copy-1.jpeg", "copy-2.jpeg", "truncated.jpeg"] + [p.name for p in REAL_XRAYS]
    )
    assert rows["copy-0.jpeg"]["path"] == f"s3://{BUCKET}/xrays/copy-0.jpeg" and rows["copy-0.jpeg"]["probability"]


def test_an_unreachable_endpoint_for_the_manifest_or_out_is_a_message(s3_endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    status, err = archive(capsys, f"s3://{BUCKET}/manifest.parquet", "--out", tmp_path / "out")
    assert status == 2 and err.startswith(f"error: cannot read the manifest s3://{BUCKET}/manifest.parquet: ")
    shutil.copy(REAL_XRAYS[0], tmp_path / REAL_XRAYS[0].name)
    status, err = archive(capsys, tmp_path / REAL_XRAYS[0].name, "--out", f"s3://{BUCKET}/results")
    assert status == 2 and err.startswith(f"error: cannot read s3://{BUCKET}/results: ")
    assert "NETWORK_CONNECTION" in err and "Traceback" not in err
