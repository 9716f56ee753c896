"""`python -m pneumonia archive --address` against a real Ray cluster (`-m slow`): a head and a
second node, each `ray start --block` in its own session with its own temp folder and 1 CPU (2 in
all), the package on their PYTHONPATH as an image with `pip install .[archive]` would have it, and
their working folder not the driver's. The command runs as a user runs it, in its own interpreter,
from another folder with relative paths and a relative --model: its rows are `predict --csv`'s and
its two actors run in the two raylets. `--address auto` finds the cluster in RAY_ADDRESS (what a
`ray job submit` entrypoint sees); and (in the default run) an address nothing answers is a message.
The cluster goes with its sessions' processes: never `ray stop`, which stops every Ray on the machine."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from builders import REAL_XRAYS, REPO, SHIPPED_MODEL

ray = pytest.importorskip("ray", reason="the archive extra (requirements-archive.txt) is not installed")

from pneumonia import cli  # noqa: E402
from pneumonia.archive.result_files import read_results  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one worker holds a Ray at a time: the 2 CPUs are the machine's
RAY = Path(sys.executable).with_name("ray")
STARTED = "Ray runtime started."  # what `ray start` prints once its node is up
# The cluster's and the driver's environment: the package importable, and no token authentication (a
# token in ~/.ray would turn it on for the head alone); the driver waits for its whole pool before the
# first block, so that each actor gets blocks (Ray Data otherwise favours the actor beside the data).
CLUSTER_ENV = {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
DRIVER_ENV = {**CLUSTER_ENV, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def session_pids(session: int) -> list[int]:
    """The processes of one session: `ray start` and all it started (Ray's workers change their
    process group, not their session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            pids.append(int(stat.parent.name))
    return pids


def kill_session(session: int) -> None:
    for pid in session_pids(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_node(args: list[str], folder: Path) -> subprocess.Popen:
    """`ray start --block ARGS` in its own session, its temp folder and working folder `folder`;
    returns once the node is up."""
    log = folder / "ray-start.log"
    command = [str(RAY), "start", "--block", "--temp-dir", str(folder), "--disable-usage-stats", *args]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            cwd=folder,
            env={**os.environ, **CLUSTER_ENV},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while STARTED not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            kill_session(process.pid)
            pytest.fail(f"{' '.join(command)} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return process


@pytest.fixture(scope="module")
def ray_cluster():
    """HOST:PORT of a head and a second node on this machine, 1 CPU each."""
    if not RAY.exists():
        pytest.skip(f"no `ray` command beside {sys.executable}")
    folders = [Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")) for _ in range(2)]  # short: Ray's socket paths
    nodes, address = [], f"127.0.0.1:{free_port()}"
    try:
        nodes.append(
            start_node(
                ["--head", "--port", address.rsplit(":", 1)[1], "--node-ip-address", "127.0.0.1"]
                + ["--num-cpus", "1", "--include-dashboard=false", "--object-store-memory", str(300 << 20)]
                + ["--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())]
                + ["--dashboard-agent-listen-port", str(free_port())],
                folders[0],
            )
        )
        nodes.append(
            start_node(
                ["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
                + ["--object-store-memory", str(300 << 20), "--dashboard-agent-listen-port", str(free_port())],
                folders[1],
            )
        )
        yield address
    finally:
        for node in reversed(nodes):
            kill_session(node.pid)
            node.wait(timeout=30)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def job_folder(tmp_path, monkeypatch):
    """A folder to run the commands from: xrays/ (the two X-rays three times each, a truncated JPEG),
    a relative model/ (a link to the shipped one) and `predict --csv`'s file for xrays/."""
    (tmp_path / "xrays").mkdir()
    for index in range(6):
        shutil.copy(REAL_XRAYS[index % 2], tmp_path / "xrays" / f"{index}-{REAL_XRAYS[index % 2].name}")
    (tmp_path / "xrays" / "truncated.jpeg").write_bytes(REAL_XRAYS[0].read_bytes()[:3000])
    (tmp_path / "model").symlink_to(SHIPPED_MODEL, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", "xrays", "--csv", "predict.csv"]) == 1
    return tmp_path


def run_archive(folder: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pneumonia", "archive", "xrays", "--out", "out", "--csv", "archive.csv", *args]
    done = subprocess.run(
        command,
        cwd=folder,
        env={**os.environ, **DRIVER_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # as predict: the truncated JPEG
    return done


def csv_rows(path: Path) -> dict[str, dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def assert_rows_are_predicts(folder: Path, done: subprocess.CompletedProcess) -> dict:
    predicted = csv_rows(folder / "predict.csv")
    assert done.stderr.strip().splitlines()[-1] == (
        "7 file(s): 6 screened, 0 refused by the gate, 1 unreadable; wrote out and archive.csv"
    )
    assert csv_rows(folder / "archive.csv") == predicted  # the paths as given, relative
    for row in read_results(str(folder / "out")).to_pylist():
        if row["probability"] is not None:
            assert abs(row["probability"] - float(predicted[row["path"]]["probability"])) <= 1e-6, row["path"]
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert (summary["files"], summary["screened"], summary["failed"], summary["screened_now"]) == (7, 6, 1, 7)
    return summary


@pytest.mark.slow
def test_the_command_on_a_two_node_cluster_gives_predict_csv_rows_with_an_actor_in_each_raylet(ray_cluster, job_folder):
    done = run_archive(
        job_folder, "--model", "model", "--actors", "2", "--rows-per-file", "1", "--address", ray_cluster
    )
    summary = assert_rows_are_predicts(job_folder, done)
    assert len(summary["actors"]) == 2
    assert len({actor["node"] for actor in summary["actors"].values()}) == 2, summary["actors"]


@pytest.mark.slow
def test_address_auto_finds_the_cluster_in_ray_address(ray_cluster, job_folder):
    done = run_archive(job_folder, "--address", "auto", env={"RAY_ADDRESS": ray_cluster})
    assert_rows_are_predicts(job_folder, done)


def test_an_address_nothing_answers_is_a_message(tmp_path, capsys):
    shutil.copy(REAL_XRAYS[0], tmp_path / REAL_XRAYS[0].name)
    address = f"127.0.0.1:{free_port()}"
    status = cli.main(["archive", str(tmp_path), "--out", str(tmp_path / "out"), "--address", address])
    assert status == 2
    assert capsys.readouterr().err.startswith(f"error: cannot reach the Ray cluster at {address}: ")
