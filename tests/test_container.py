"""The container image (Dockerfile, docs/containers.md), built and run here as a hospital runs it.

The image is built on a local Debian base (.ci/docker-base makes it with debootstrap once and keeps
it: no image registry is reachable here), with the CA bundle this machine's pip trusts as the build's
extra-ca.pem, then run with `--network host --read-only --tmpfs /tmp --memory 512m` and access keys
from a mounted file: /healthz and the image's HEALTHCHECK, a real X-ray 200 with a key, a colour
photo 422, no key 401, nothing written outside the tmpfs, no OOM kill, and `docker stop` answering
the upload in flight and stopping within 10 s. `pacs watch` runs from the image against the local
Orthanc the PACS tests use; the compose example validates with `docker-compose config`, and runs, with
Debian's Orthanc standing in for the Orthanc team's image (which cannot be pulled here).
Skipped, saying why, where no Docker engine answers (.ci/run installs docker.io and starts dockerd).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from builders import ACCESS_KEYS, REAL_XRAYS, REPO, dicom_bytes, free_port, sample_photo

# One tag per checkout: two checkouts testing on one engine do not run each other's image.
IMAGE = f"pneumonia-ci:{hashlib.sha256(str(REPO).encode()).hexdigest()[:12]}"
BASE = os.environ.get("PNEUMONIA_DOCKER_BASE", "pneumonia-base:bookworm")
MAX_MB_OVER_BASE = 550
STOP_S = 10
KEYS_IN_CONTAINER = "/run/secrets/pneumonia-keys"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# One worker runs them all, in order: one image build, one engine.
pytestmark = pytest.mark.xdist_group("docker")


def docker(*args, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(map(str, args))}:\n{result.stdout}{result.stderr}"
    return result


def engine_missing() -> str | None:
    """Why no image can be built and run here, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed (.ci/run installs docker.io and starts dockerd)"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0 or not info.stdout.strip():
        last = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker engine answers ({last}); .ci/run starts dockerd where it can"
    return None


@contextmanager
def build_ca():
    """The build context's extra-ca.pem: the repository's own if it has one, else the CA bundle this
    machine trusts (PIP_CERT, SSL_CERT_FILE, else Debian's system bundle: a TLS-intercepting proxy's
    CA is in it), written for the build and removed after it. None: the base image's CAs alone."""
    target = REPO / "extra-ca.pem"
    candidates = (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), SYSTEM_CA_BUNDLE)
    bundle = next((Path(p) for p in candidates if p and Path(p).is_file()), None)
    written = not target.exists() and bundle is not None
    if written:
        shutil.copyfile(bundle, target)
    try:
        yield
    finally:
        if written:
            target.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def image():
    """IMAGE built from the repository on BASE (made by .ci/docker-base unless it is there)."""
    if reason := engine_missing():
        pytest.skip(reason)
    made = subprocess.run([REPO / ".ci" / "docker-base", BASE], capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, f".ci/docker-base {BASE} failed:\n{made.stdout}{made.stderr}"
    before = docker("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    with build_ca():
        started = time.monotonic()
        docker("build", "--network", "host", "--build-arg", f"BASE={BASE}", "-t", IMAGE, REPO, timeout=900)
        print(f"docker build: {time.monotonic() - started:.1f} s")
    if before and before != docker("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip():
        # The last run's image, untagged by this build: removed, or a CI machine keeps one per run
        # (~680 MB each). Its layers the new image shares stay, and so the build cache.
        docker("rmi", before, check=False)
    return IMAGE


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    """The access keys as a mounted secret holds them: one a line, with a comment."""
    path = tmp_path_factory.mktemp("secrets") / "pneumonia-keys"
    path.write_text("# rotated 2026-12\n" + "".join(f"{key}\n" for key in ACCESS_KEYS))
    path.chmod(0o644)
    return path


@contextmanager
def running(image: str, keys_file: Path, *options: str, **env: str):
    """The image run as a hospital runs it; yields (container name, base URL) once /healthz answers 200."""
    name, port = f"pneumonia-test-{uuid.uuid4().hex[:8]}", free_port()
    settings = {"PORT": str(port), "PNEUMONIA_ACCESS_KEYS_FILE": KEYS_IN_CONTAINER, **env}
    environment = [arg for key, value in settings.items() for arg in ("--env", f"{key}={value}")]
    docker(
        "run", "--detach", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "--memory", "512m", "--volume", f"{keys_file}:{KEYS_IN_CONTAINER}:ro", *environment, *options, image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(name, url)
        yield name, url
    finally:
        docker("rm", "--force", name, check=False)


def wait_ready(name: str, url: str, within_s: float = 90) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        state = docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", f"the container is {state}:\n{logs(name)}"
        assert time.monotonic() < deadline, f"/healthz not ready within {within_s:g} s:\n{logs(name)}"
        time.sleep(0.5)


def logs(name: str) -> str:
    result = docker("logs", name, check=False)
    return result.stdout + result.stderr


def inspect(name: str, template: str) -> str:
    return docker("inspect", "--format", template, name).stdout.strip()


@pytest.fixture(scope="module")
def served(image, keys_file):
    with running(image, keys_file, "--health-interval", "1s") as container:
        yield container


def bearer(key: str = ACCESS_KEYS[1]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def xray_upload() -> dict:
    return {"file": (REAL_XRAYS[0].name, REAL_XRAYS[0].read_bytes(), "image/jpeg")}


# --- The image ------------------------------------------------------------------------------------


def test_the_image_is_within_550_mb_over_its_base(image):
    size, base = (int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout) for name in (image, BASE))
    over = (size - base) / 1e6
    print(f"{image}: {size / 1e6:.1f} MB, {over:.1f} MB over {BASE} ({base / 1e6:.1f} MB)")
    assert over <= MAX_MB_OVER_BASE, f"{over:.1f} MB over the base"


def test_the_image_runs_as_uid_1000_serves_on_port_and_has_a_healthcheck_and_no_build_ca(image):
    config = docker("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Healthcheck.Test}}", image)
    user, healthcheck = config.stdout.strip().split(" ", 1)
    assert user == "1000:1000" and "/healthz" in healthcheck
    ran = docker("run", "--rm", "--read-only", image, "sh", "-c", "id -u; id -g; echo $PORT")
    assert ran.stdout.split() == ["1000", "1000", "8000"], ran.stdout
    # Serving without TensorFlow; nothing of the build's CA (extra-ca.pem) left anywhere, as root sees it.
    assert (
        "No module named 'tensorflow'"
        in docker("run", "--rm", image, "python", "-c", "import tensorflow", check=False).stderr
    )
    leftovers = "find / -xdev \\( -name extra-ca.pem -o -name ca-bundle.pem -o -path /build \\) -print"
    assert docker("run", "--rm", "--user", "0", image, "sh", "-c", leftovers).stdout == ""


# --- Served: read-only, keys from a file, 512 MiB ------------------------------------------------


def test_healthz_is_ready_and_the_images_healthcheck_says_healthy(served):
    name, url = served
    assert requests.get(f"{url}/healthz", timeout=10).json()
    deadline = time.monotonic() + 30
    while (health := inspect(name, "{{.State.Health.Status}}")) != "healthy":
        assert health == "starting" and time.monotonic() < deadline, (
            f"health {health}: {inspect(name, '{{json .State.Health}}')}"
        )
        time.sleep(0.5)


def test_a_real_xray_with_a_key_is_screened(served):
    _, url = served
    answer = requests.post(f"{url}/api/predict", files=xray_upload(), headers=bearer(), timeout=60)
    assert answer.status_code == 200, answer.text
    assert 0 <= answer.json()["probability"] <= 1


def test_a_colour_photo_is_refused_422(served):
    _, url = served
    photo = {"file": ("flower.jpg", sample_photo("flower.jpg"), "image/jpeg")}
    answer = requests.post(f"{url}/api/predict", files=photo, headers=bearer(ACCESS_KEYS[0]), timeout=60)
    assert answer.status_code == 422, answer.text


def test_no_key_is_401_and_a_wrong_one_too(served):
    _, url = served
    assert requests.post(f"{url}/api/predict", files=xray_upload(), timeout=60).status_code == 401
    wrong = requests.post(f"{url}/api/predict", files=xray_upload(), headers=bearer("w" * 24), timeout=60)
    assert wrong.status_code == 401


def test_nothing_is_written_outside_the_tmpfs_and_no_key_is_logged(served):
    name, _ = served
    assert inspect(name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    # What docker diff lists: only the mount point it made for the keys file.
    assert set(docker("diff", name).stdout.split("\n")) <= {"", "C /run", "A /run/secrets", f"A {KEYS_IN_CONTAINER}"}
    log = logs(name)
    assert "Access: 2 key(s)" in log and "Read-only file system" not in log
    assert not any(key in log for key in ACCESS_KEYS)


def test_uploads_at_once_in_512_mib_kill_nothing(served):
    name, url = served

    def screen(_):
        return requests.post(f"{url}/api/predict", files=xray_upload(), headers=bearer(), timeout=120).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(screen, range(32))) == {200}
    assert inspect(name, "{{.State.OOMKilled}}") == "false"
    log = logs(name)
    assert log.count("Booting worker") == 1 and "SIGKILL" not in log, log
    if (peak := peak_memory(inspect(name, "{{.Id}}"))) is not None:
        print(f"peak memory of the container after 32 uploads, 8 at once: {peak / 2**20:.0f} MiB of 512")


def peak_memory(container_id: str) -> int | None:
    """The container's peak memory as the host's cgroup counts it (v1 or v2), where it is readable."""
    for path in (
        f"/sys/fs/cgroup/memory/docker/{container_id}/memory.max_usage_in_bytes",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.peak",
    ):
        try:
            return int(Path(path).read_text())
        except (OSError, ValueError):
            continue
    return None


# --- Stopping -------------------------------------------------------------------------------------


def test_docker_stop_answers_the_upload_in_flight_and_stops_within_10_s(image, keys_file):
    with running(image, keys_file) as (name, url):
        prepared = requests.Request("POST", f"{url}/api/predict", files=xray_upload(), headers=bearer()).prepare()
        head = "".join(f"{k}: {v}\r\n" for k, v in prepared.headers.items())
        request = f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{head}\r\n".encode()
        body, half = prepared.body, len(prepared.body) // 2
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request + body[:half])
            time.sleep(0.5)  # the worker has the request and waits for the rest of its body
            stopped: dict = {}

            def stop():
                started = time.monotonic()
                stopped["result"] = docker("stop", "--time", STOP_S, name, timeout=60, check=False)
                stopped["seconds"] = time.monotonic() - started

            stopping = threading.Thread(target=stop)
            stopping.start()
            time.sleep(1.0)  # SIGTERM is in
            sock.sendall(body[half:])
            answer = read_all(sock)
            stopping.join(60)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert stopped["result"].returncode == 0, stopped["result"].stderr
        print(f"docker stop: {stopped['seconds']:.2f} s")
        assert stopped["seconds"] < STOP_S
        state = inspect(name, "{{.State.ExitCode}} {{.State.OOMKilled}}")
        assert state == "0 false", f"{state}\n{logs(name)}"  # gunicorn's own clean exit, not a SIGKILL (137)
        assert "Handling signal: term" in logs(name)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --- pacs watch from the image, and the compose example -------------------------------------------


def test_pacs_watch_from_the_image_stores_results_in_a_local_orthanc(image, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    from pneumonia.pacs import local_orthanc

    if reason := local_orthanc.missing():
        pytest.skip(reason)
    study = generate_uid()
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray_pixels(), bits_stored=8)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), "CR"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with local_orthanc.orthanc_server(tmp_path) as dicomweb:
        root = dicomweb.rsplit("/dicom-web", 1)[0]
        assert requests.post(f"{root}/instances", data=buffer.getvalue(), timeout=30).status_code == 200
        watched = docker(
            "run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", "--memory", "512m", image,
            "python", "-m", "pneumonia", "pacs", "watch", dicomweb, "--study", study,
            "--interval", "1", "--max-runs", "2",
            timeout=300, check=False,
        )  # fmt: skip
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "stored SR" in watched.stdout and "skipped" in watched.stdout  # the second run skips it
        series = requests.get(f"{dicomweb}/studies/{study}/series", params={"Modality": "SR"}, timeout=30).json()
        assert len(series) == 1


def xray_pixels():
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(REAL_XRAYS[0]).convert("L"))


def test_the_compose_example_validates(tmp_path):
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    result = subprocess.run(
        [compose, "--file", REPO / "compose.yaml", "config", "--quiet"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# The orthancteam/orthanc image cannot be pulled here: Debian's Orthanc and DICOMweb plugin stand in for
# it, reading its configuration from /etc/orthanc/ as that image does (compose.yaml's users file too).
LOCAL_ORTHANC = "pneumonia-ci-orthanc:latest"
LOCAL_ORTHANC_DOCKERFILE = f"""FROM {BASE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      orthanc orthanc-dicomweb >/dev/null \\
 && rm -rf /var/lib/apt/lists/* /etc/orthanc/* \\
 && echo '{{"Name": "local", "StorageDirectory": "/var/lib/orthanc/db", "IndexDirectory": "/var/lib/orthanc/db", \\
"RemoteAccessAllowed": true, "AuthenticationEnabled": true, "DicomPort": 4242, \\
"Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"], "DicomWeb": {{"Enable": true}}}}' \\
    > /etc/orthanc/orthanc.json
CMD ["Orthanc", "/etc/orthanc/"]
"""
# The example as it is, but for its images (this build, the stand-in) and host ports (free ones, on
# loopback), and a watch that polls every 2 s.
OVERRIDE = """services:
  orthanc:
    image: {orthanc}
  watch:
    command: [pacs, watch, "http://orthanc:8042/dicom-web", --user, screener, --interval, "2", --max-runs, "1000"]
"""


@pytest.fixture
def compose_project(image, tmp_path):
    """compose.yaml copied to tmp_path with its secrets made as docs/containers.md makes them; yields
    (run docker-compose, app URL, Orthanc REST root, the PACS password, the access key)."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    built = subprocess.run(
        ["docker", "build", "--network", "host", "-t", LOCAL_ORTHANC, "-"],
        input=LOCAL_ORTHANC_DOCKERFILE, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    app_port, orthanc_port, dicom_port = free_port(), free_port(), free_port()
    text = (REPO / "compose.yaml").read_text()
    for old, new in (
        ('"8000:8000"', f'"127.0.0.1:{app_port}:8000"'),
        ('"4242:4242"', f'"127.0.0.1:{dicom_port}:4242"'),
        ('"127.0.0.1:8042:8042"', f'"127.0.0.1:{orthanc_port}:8042"'),
        ("image: pneumonia\n", f"image: {image}\n"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "compose.yaml").write_text(text)
    (tmp_path / "compose.override.yaml").write_text(OVERRIDE.format(orthanc=LOCAL_ORTHANC))
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    key, password = f"compose-key-{uuid.uuid4().hex}", f"pacs-{uuid.uuid4().hex}"
    (secrets_dir / "pneumonia-keys").write_text(key + "\n")
    (secrets_dir / "pacs-password").write_text(password + "\n")
    (secrets_dir / "orthanc-users.json").write_text(f'{{"RegisteredUsers": {{"screener": "{password}"}}}}\n')
    for path in secrets_dir.iterdir():
        path.chmod(0o644)
    project = f"pneumoniaci{uuid.uuid4().hex[:8]}"

    def run(*args, timeout=180):
        return subprocess.run(
            [compose, "--project-name", project, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout
        )

    try:
        up = run("up", "--detach", "--no-build")
        assert up.returncode == 0, up.stdout + up.stderr
        yield run, f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{orthanc_port}", password, key
    finally:
        run("down", "--volumes")


def test_the_compose_example_screens_what_arrives_in_orthanc_and_stops_cleanly(compose_project):
    import pydicom
    from pydicom.uid import generate_uid

    run, app, orthanc, password, key = compose_project
    wait_answering(f"{orthanc}/system", auth=("screener", password))
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray_pixels(), bits_stored=8)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CR"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    stored = requests.post(f"{orthanc}/instances", data=buffer.getvalue(), auth=("screener", password), timeout=30)
    assert stored.status_code == 200, stored.text
    deadline = time.monotonic() + 120
    while "stored SR" not in (watched := run("logs", "--no-color", "watch").stdout):
        assert time.monotonic() < deadline, watched
        time.sleep(1)
    wait_answering(f"{app}/healthz")
    upload = xray_upload()
    assert requests.post(f"{app}/api/predict", files=upload, headers=bearer(key), timeout=60).status_code == 200
    assert requests.post(f"{app}/api/predict", files=upload, timeout=60).status_code == 401
    started = time.monotonic()
    assert run("stop").returncode == 0
    print(f"docker-compose stop: {time.monotonic() - started:.2f} s")
    assert time.monotonic() - started < STOP_S
    states = run("ps").stdout
    assert "Exit 137" not in states, states  # nothing was killed for outlasting the grace period


def wait_answering(url: str, auth=None, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            if requests.get(url, auth=auth, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {within_s:g} s"
        time.sleep(0.5)
