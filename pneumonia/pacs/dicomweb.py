"""A small DICOMweb client: QIDO-RS searches, WADO-RS instance and metadata retrieval, STOW-RS stores.

Every request goes through `DicomWeb._request`: a timeout, TLS verification unless turned off, and
retries with exponential backoff for what a retry can cure (connection errors, timeouts, 5xx). Errors
are `PacsError`s whose messages name the operation and the HTTP status, never a response body (a PACS
may quote patient data in it):

    PacsUnreachable  the PACS cannot be reached (refused, DNS, TLS, timeouts after the retries)
    PacsAuthError    401 / 403: wrong or missing credentials
    PacsError        anything else (4xx, 5xx after the retries, a malformed answer)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import requests

from pneumonia.pacs.multipart import DICOM, related_body

LOG = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
RETRIED_STATUSES = frozenset({500, 502, 503, 504})
QIDO_PAGE = 500  # results asked for per QIDO request (limit/offset paging)


class PacsError(Exception):
    """A DICOMweb request that failed; the message is meant for a person."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class PacsUnreachable(PacsError):
    """No answer from the PACS: connection refused, name not found, TLS failure, timeouts."""


class PacsAuthError(PacsError):
    """The PACS refused the credentials (401) or the operation (403)."""


@dataclass(frozen=True)
class Connection:
    """Where the PACS is and how to talk to it. `verify`: True, False or a CA bundle path."""

    url: str  # the DICOMweb root, e.g. https://pacs.example.org/dicom-web
    user: str | None = None
    password: str | None = None
    token: str | None = None
    verify: bool | str = True
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0  # waits backoff, 2 backoff, 4 backoff, ... between tries


def _join(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


class DicomWeb:
    """One PACS, one `requests.Session`. Not shared between threads."""

    def __init__(self, connection: Connection, sleep=time.sleep):
        self.connection = connection
        self.sleep = sleep
        self.session = requests.Session()
        self.session.verify = connection.verify
        if connection.token:
            self.session.headers["Authorization"] = f"Bearer {connection.token}"
        elif connection.user is not None:
            self.session.auth = (connection.user, connection.password or "")

    def close(self) -> None:
        self.session.close()

    # --- QIDO-RS ------------------------------------------------------------------------------

    def search(self, path: str, params: dict | None = None) -> Iterator[dict]:
        """QIDO-RS `path` (studies, series, instances, studies/{uid}/instances, ...): DICOM JSON
        objects, a page at a time."""
        offset = 0
        while True:
            query = {**(params or {}), "limit": str(QIDO_PAGE), "offset": str(offset)}
            response = self._request("GET", path, f"search {path}", params=query, headers={"Accept": DICOM_JSON})
            found = _json(response, f"search {path}") if response.content else []
            yield from found
            if len(found) < QIDO_PAGE:
                return
            offset += len(found)

    # --- WADO-RS ------------------------------------------------------------------------------

    def retrieve_instance(self, study: str, series: str, instance: str) -> bytes:
        """One instance as DICOM Part 10 bytes, in the transfer syntax the PACS holds it in."""
        path = f"studies/{study}/series/{series}/instances/{instance}"
        accept = f'multipart/related; type="{DICOM}"; transfer-syntax=*'
        response = self._request("GET", path, "retrieve an image", headers={"Accept": accept})
        parts = multipart_parts(response)
        if len(parts) != 1:
            raise PacsError(f"retrieve an image: the PACS sent {len(parts)} parts instead of one")
        return parts[0]

    def series_metadata(self, study: str, series: str) -> list[dict]:
        """The DICOM JSON metadata of every instance of a series (bulk data left out)."""
        path = f"studies/{study}/series/{series}/metadata"
        response = self._request("GET", path, "read a result's metadata", headers={"Accept": DICOM_JSON})
        return _json(response, "read a result's metadata")

    # --- STOW-RS ------------------------------------------------------------------------------

    def store(self, study: str, instances: list[bytes]) -> None:
        """STOW-RS `instances` (Part 10 bytes) into `study` in one request; PacsError unless the PACS
        stored every one (a 200 with no Failed SOP Sequence)."""
        content_type, body = related_body(instances)
        headers = {"Content-Type": content_type, "Accept": DICOM_JSON}
        response = self._request("POST", f"studies/{study}", "store the results", data=body, headers=headers)
        answer = _json(response, "store the results") if response.content else {}
        failed = (answer.get("00081198") or {}).get("Value") or []
        if failed:
            reasons = sorted({str(((item.get("00081197") or {}).get("Value") or ["?"])[0]) for item in failed})
            raise PacsError(
                f"the PACS rejected {len(failed)} of {len(instances)} result object(s) "
                f"(STOW-RS failure reason {', '.join(reasons)})",
                response.status_code,
            )

    # --- Every request ------------------------------------------------------------------------

    def _request(self, method: str, path: str, what: str, **kwargs) -> requests.Response:
        """`method` on the PACS with retries for connection errors, timeouts and 5xx."""
        url, tries = _join(self.connection.url, path), self.connection.retries + 1
        for attempt in range(tries):
            last = attempt == tries - 1
            try:
                # verify per request: requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE override the
                # session's, which would make --ca-bundle and --insecure do nothing wherever they are set
                response = self.session.request(
                    method, url, timeout=self.connection.timeout_s, verify=self.connection.verify, **kwargs
                )
            except requests.exceptions.SSLError as err:
                raise PacsUnreachable(f"{what}: TLS verification of {self.connection.url} failed ({err})") from None
            except (requests.ConnectionError, requests.Timeout) as err:
                if last:
                    raise PacsUnreachable(
                        f"{what}: the PACS at {self.connection.url} is unreachable after {tries} tries "
                        f"({self._failure(err)})"
                    ) from None
            else:
                if response.status_code < 300:
                    return response
                if response.status_code not in RETRIED_STATUSES or last:
                    raise _status_error(what, response)
            wait = self.connection.backoff_s * 2**attempt
            LOG.warning("%s: try %d of %d failed; retrying in %.1f s", what, attempt + 1, tries, wait)
            self.sleep(wait)
        raise AssertionError("unreachable")  # the last try returns or raises

    def _failure(self, err: requests.RequestException) -> str:
        """What went wrong, in words: a timeout names the limit (--timeout), anything else its type."""
        if isinstance(err, requests.Timeout):
            return f"no answer within {self.connection.timeout_s:g} s: {type(err).__name__}"
        return type(err).__name__


def _status_error(what: str, response: requests.Response) -> PacsError:
    status = response.status_code
    if status == 401:
        return PacsAuthError(f"{what}: the PACS refused the credentials (HTTP 401)", status)
    if status == 403:
        return PacsAuthError(f"{what}: the PACS does not allow this user to do that (HTTP 403)", status)
    return PacsError(f"{what}: the PACS answered HTTP {status} {response.reason or ''}".rstrip(), status)


def _json(response: requests.Response, what: str):
    try:
        return response.json()
    except ValueError:
        raise PacsError(f"{what}: the PACS answer is not JSON") from None


def multipart_parts(response: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related answer (WADO-RS)."""
    content_type = response.headers.get("Content-Type", "")
    boundary = None
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise PacsError(f"retrieve an image: the PACS answered {content_type or 'no content type'}, not multipart")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in response.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        _, separator, body = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise PacsError("retrieve an image: a malformed multipart part")
        parts.append(body[:-2] if body.endswith(b"\r\n") else body)
    return parts


def first_value(item: dict, tag: str, default=None):
    """The first value of `tag` (8 hex digits) in a DICOM JSON object, or `default`."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default
