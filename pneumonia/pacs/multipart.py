"""DICOM instances as one multipart/related body (DICOMweb, PS3.18 8.6.1.2): what STOW-RS takes, what
WADO-RS answers, and what the web app answers for `?result=dicom`. Imports nothing but the standard library."""

from __future__ import annotations

import uuid

DICOM = "application/dicom"


def related_body(instances: list[bytes]) -> tuple[str, bytes]:
    """(Content-Type, body) of `instances` (Part 10 bytes) as multipart/related; type="application/dicom"."""
    delimiter = b"--" + uuid.uuid4().hex.encode()
    head = b"\r\nContent-Type: " + DICOM.encode() + b"\r\n\r\n"
    body = b"".join(delimiter + head + data + b"\r\n" for data in instances) + delimiter + b"--\r\n"
    return f'multipart/related; type="{DICOM}"; boundary={delimiter[2:].decode()}', body
