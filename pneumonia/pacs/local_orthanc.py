"""A throwaway Orthanc with its DICOMweb plugin on a free loopback port, storing under a folder of its own:
what the PACS tests and bench/benchmark_pacs.py screen against (Debian: apt-get install orthanc
orthanc-dicomweb). Imports the standard library only."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_S = 30.0


class OrthancMissing(RuntimeError):
    """The Orthanc binary or its DICOMweb plugin is not installed."""


def missing() -> str | None:
    """Why no Orthanc can be started here, or None."""
    if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.is_file():
        return "Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configuration(folder: Path, port: int, **settings) -> dict:
    """Orthanc's configuration: loopback only, no DICOM port, no users unless `settings` add them."""
    return {
        "Name": "pneumonia-local",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **settings,
    }


def wait_until_answering(root: str, process: subprocess.Popen, log: Path) -> None:
    """Until Orthanc answers HTTP at `root` (any status: a 401 is an answer too)."""
    deadline = time.monotonic() + START_S
    while True:
        try:
            urllib.request.urlopen(f"{root}/system", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {process.returncode}:\n{log.read_text()}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within {START_S:g} s:\n{log.read_text()}") from None
            time.sleep(0.2)


@contextmanager
def orthanc_server(folder: Path, **settings) -> Iterator[str]:
    """Orthanc storing under `folder` (its configuration and log there too), `settings` over the
    defaults; yields its DICOMweb root and stops it on exit. OrthancMissing when it cannot be had."""
    if reason := missing():
        raise OrthancMissing(reason)
    port = free_port()
    (folder / "orthanc.json").write_text(json.dumps(configuration(folder, port, **settings)))
    log_path = folder / "orthanc.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [shutil.which("Orthanc"), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            root = f"http://127.0.0.1:{port}"
            wait_until_answering(root, process, log_path)
            yield f"{root}/dicom-web"
        finally:
            process.terminate()
            process.wait(30)
