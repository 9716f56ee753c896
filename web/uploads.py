"""Uploads: kept in memory, checked for an allowed image type before any decoder sees them."""
from __future__ import annotations

import io

from flask import Request

# Magic numbers of the accepted types; everything else is refused without being decoded.
SIGNATURES = (
    ("JPEG", 0, b"\xff\xd8\xff"),
    ("PNG", 0, b"\x89PNG\r\n\x1a\n"),
    ("BMP", 0, b"BM"),
    ("TIFF", 0, b"II*\x00"),
    ("TIFF", 0, b"MM\x00*"),
    ("DICOM", 128, b"DICM"),
)
ACCEPTED = "JPEG, PNG, BMP, TIFF or DICOM"


class UploadError(Exception):
    """A request whose upload cannot be screened; `message` is shown to the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class InMemoryRequest(Request):
    """Werkzeug spools uploads over 500 kB to a temporary file; X-rays must never touch
    the disk, so every file part goes to a BytesIO (bounded by MAX_CONTENT_LENGTH)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def sniff_format(data: bytes) -> str | None:
    for name, offset, magic in SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def read_upload(request: Request) -> bytes:
    """The bytes of the multipart field `file`, or an UploadError saying what is wrong."""
    upload = request.files.get("file")
    if upload is None:
        raise UploadError(400, "No file was uploaded: choose a chest X-ray image (form field \"file\").")
    data = upload.read()
    if not data:
        if not upload.filename:
            raise UploadError(400, "No file was chosen: choose a chest X-ray image to upload.")
        raise UploadError(400, "The uploaded file is empty.")
    if sniff_format(data) is None:
        raise UploadError(415, f"The upload is not a supported image type. Upload a {ACCEPTED} file.")
    return data
