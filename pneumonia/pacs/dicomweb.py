"""The PACS over DICOMweb: dicomweb-client's `DICOMwebClient` (QIDO-RS searches, WADO-RS retrieval,
STOW-RS stores: it writes and parses the HTTP and the multipart bodies) on one `requests.Session`,
wrapped for a screening run.

What the wrapper adds: TLS verification that `--ca-bundle` / `--insecure` control even where
$REQUESTS_CA_BUNDLE is set (`PacsSession`), retries with exponential backoff for what a retry can
cure (urllib3's `Retry` on the session: connection errors, timeouts, 429 and 5xx, after the wait a
Retry-After asks for; dicomweb-client's own are turned off), QIDO paging, and errors that are
`PacsError`s whose messages name the operation and the HTTP status, never a response body (a PACS
may quote patient data in it):

    PacsUnreachable  the PACS cannot be reached (refused, DNS, TLS, timeouts after the retries)
    PacsAuthError    401 / 403: wrong or missing credentials
    PacsError        anything else (4xx, 5xx after the retries, an answer that is not DICOM)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import UID
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, InvalidHeader, MaxRetryError, ReadTimeoutError
from urllib3.util.retry import Retry

LOG = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
# urllib3's timeouts after the retries, named as requests names them when it raises them itself
TIMEOUT_NAMES = {ReadTimeoutError: "ReadTimeout", ConnectTimeoutError: "ConnectTimeout"}
QIDO_PAGE = 500  # results asked for per QIDO request (limit/offset paging)
# dicomweb-client sends a STOW body over its chunk size chunked; a Content-Length goes through the
# gateways and WSGI servers in front of some PACSs that refuse chunked uploads (Orthanc takes both)
STORED_IN_ONE_BODY = 2**31
# WADO-RS: any transfer syntax, i.e. the PACS's own, not transcoded
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def single_part(content_type: str, body: bytes) -> bytes:
    """The one body part of a multipart/related answer (PS3.18 8.6.1.2), or the body of an answer sent as
    application/dicom itself (some servers do); ValueError for anything else. Split on its boundary
    only: the part's bytes are not parsed."""
    message = Message()
    message["Content-Type"] = content_type
    if message.get_content_type() == "application/dicom":
        return body
    boundary = message.get_param("boundary")
    if message.get_content_type() != "multipart/related" or not boundary:
        raise ValueError(f"it is {message.get_content_type()}")
    delimiter = b"--" + str(boundary).encode("latin-1")
    parts = body.split(delimiter)[1:-1]  # the preamble before the first delimiter, "--" and the epilogue after the last
    if len(parts) != 1:
        raise ValueError(f"{len(parts)} parts")
    head, separator, content = parts[0].partition(b"\r\n\r\n")
    if not separator:
        raise ValueError("a part without headers")
    return content.removesuffix(b"\r\n")


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


class PacsSession(requests.Session):
    """A session that asks again for a GET whose answer broke off after its headers (requests reads the
    body after urllib3's retries are done, so they never see it), as often and with the waits of the
    adapter's `Retry` (`retry`); and that passes its `verify` with every request: dicomweb-client passes
    none, and requests then lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE replace the session's own, so
    --ca-bundle and --insecure would do nothing wherever they are set. (An explicit True still takes the
    environment's bundle.)"""

    retry: Retry = Retry(0)  # session_of gives it the connection's policy

    def request(self, method, url, *args, **kwargs):
        kwargs.setdefault("verify", self.verify)
        if method != "GET":
            self._close_pooled_connections()
            return super().request(method, url, *args, **kwargs)
        retry = self.retry
        for broken in range(retry.total or 0):
            try:
                return super().request(method, url, *args, **kwargs)
            except requests.exceptions.ChunkedEncodingError:
                wait = retry.backoff_factor * 2**broken
                LOG.warning("GET: try %d failed (its answer broke off); retrying in %.1f s", broken + 1, wait)
                time.sleep(wait)
        return super().request(method, url, *args, **kwargs)

    def _close_pooled_connections(self) -> None:
        """Why a POST (STOW-RS) goes on a new connection: it is never sent again once the PACS may have
        received it, and a kept-alive connection can be closed by the PACS as the request goes out. Orthanc
        closes one after 1 s idle (measured), and a STOW follows the screening of the images it searched
        and fetched on that connection; CI once lost a `pacs screen --force` to it. One handshake a study."""
        for adapter in self.adapters.values():
            adapter.close()


class Backoff(Retry):
    """urllib3's `Retry` waiting `backoff_factor` x 1, 2, 4, ... (urllib3's own waits nothing before the
    first retry), and saying so on the log as each retry waits."""

    def get_backoff_time(self) -> float:
        return self.backoff_factor * 2 ** (len(self.history) - 1)

    def get_retry_after(self, response) -> float | None:
        """The wait a Retry-After asks for; None without one, or with one that is neither seconds nor a date
        ("Retry-After: soon": urllib3 raises, and the request would fail instead of waiting the backoff)."""
        try:
            return super().get_retry_after(response)
        except InvalidHeader:
            return None

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        """As urllib3 decides, and a 429 whatever the method: a PACS that answers "too many requests" has
        refused the request, not received it (RFC 6585), so a STOW-RS POST may be sent again after it."""
        return status_code == 429 or super().is_retry(method, status_code, has_retry_after)

    def sleep(self, response=None) -> None:
        failed = self.history[-1]
        cause = f"HTTP {failed.status}" if failed.status else type(failed.error).__name__
        asked = self.get_retry_after(response) if response is not None else None
        tries = len(self.history) + (self.total or 0) + 1
        wait = self.get_backoff_time() if asked is None else asked
        LOG.warning(
            "%s: try %d of %d failed (%s); retrying in %.1f s", failed.method, len(self.history), tries, cause, wait
        )
        super().sleep(response)


def retry_policy(connection: Connection) -> Backoff:
    """`connection.retries` retries of connection errors, timeouts, 429 and 5xx. Only the idempotent
    methods (GET: QIDO-RS, WADO-RS) are sent again once the PACS may have received them: a STOW-RS POST
    is retried when its connection could not be made or the PACS answered 429 (it refused the request),
    never after a timeout, a dropped connection or another status. The last answer of a status that is still
    failing is returned as it is (dicomweb-client raises it, with its status); errors that are neither of a
    connection nor of a read (TLS) are not retried."""
    return Backoff(
        total=connection.retries,
        other=0,
        status_forcelist=RETRIED_STATUSES,
        backoff_factor=connection.backoff_s,
        raise_on_status=False,
    )


def session_of(connection: Connection) -> PacsSession:
    session = PacsSession()
    session.verify = connection.verify
    session.retry = retry_policy(connection)
    adapter = HTTPAdapter(max_retries=session.retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if connection.token:
        session.headers["Authorization"] = f"Bearer {connection.token}"
    elif connection.user is not None:
        session.auth = (connection.user, connection.password or "")
    return session


class DicomWeb:
    """One PACS, one session. Not shared between threads."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.session = session_of(connection)
        try:
            self.client = DICOMwebClient(
                connection.url, session=self.session, timeout=connection.timeout_s, chunk_size=STORED_IN_ONE_BODY
            )
        except ValueError:  # dicomweb-client's "Malformed URL"
            self.session.close()
            raise PacsError(f"{connection.url}: not a DICOMweb URL (http://HOST/PATH or https://HOST/PATH)") from None
        self.client.set_http_retry_params(retry=False)  # retried by the session: connection errors and 5xx too

    def close(self) -> None:
        self.session.close()

    # --- QIDO-RS ------------------------------------------------------------------------------

    def search_instances(self, study: str | None, filters: dict, fields: tuple[str, ...]) -> Iterator[dict]:
        """QIDO-RS instances (of `study`, or of the whole PACS) matching `filters`: DICOM JSON objects."""
        if study is not None and not UID(study).is_valid:
            raise PacsError(f"--study {study}: not a DICOM UID (digits and dots)")
        return self._pages(
            "search for images", self.client.search_for_instances, study_instance_uid=study,
            search_filters=filters, fields=list(fields),
        )  # fmt: skip

    def search_series(self, study: str, filters: dict, fields: tuple[str, ...]) -> Iterator[dict]:
        """QIDO-RS series of `study` matching `filters`: DICOM JSON objects."""
        return self._pages(
            "search for result series", self.client.search_for_series, study_instance_uid=study,
            search_filters=filters, fields=list(fields),
        )  # fmt: skip

    def _pages(self, what: str, search: Callable[..., list[dict]], **query) -> Iterator[dict]:
        """`search`'s results a page at a time. Not dicomweb-client's get_remaining: it stops at an empty
        page only, so a PACS that ignores `offset` would be asked forever."""
        offset = 0
        while True:
            found = self._call(what, search, limit=QIDO_PAGE, offset=offset, **query)
            yield from found
            if len(found) < QIDO_PAGE:
                return
            offset += len(found)

    # --- WADO-RS ------------------------------------------------------------------------------

    def retrieve_instance(self, study: str, series: str, instance: str) -> bytes:
        """One instance in the transfer syntax the PACS holds it in (transcoding would cost the PACS time and
        may be lossy), as the Part 10 bytes it sent: nothing of it is parsed here; the decoding sandbox reads
        its header and its pixels (pneumonia/serving/sandbox.py)."""
        what = "retrieve an image"
        uids = (study, series, instance)
        if not all(UID(uid).is_valid for uid in uids):
            raise PacsError(f"{what}: the PACS named it by UIDs that are not DICOM UIDs")
        url = f"{self.connection.url.rstrip('/')}/studies/{study}/series/{series}/instances/{instance}"
        response = self._call(what, self._get, url, {"Accept": ACCEPT_AS_STORED})
        try:
            return single_part(response.headers.get("Content-Type", ""), response.content)
        except ValueError as err:
            raise PacsError(f"{what}: the PACS's answer is not one DICOM instance ({err})") from None

    def _get(self, url: str, headers: dict) -> requests.Response:
        response = self.session.get(url, headers=headers, timeout=self.connection.timeout_s)
        response.raise_for_status()
        return response

    def series_metadata(self, study: str, series: str) -> list[dict]:
        """The DICOM JSON metadata of every instance of a series (bulk data left out)."""
        return self._call("read a result's metadata", self.client.retrieve_series_metadata, study, series)

    # --- STOW-RS ------------------------------------------------------------------------------

    def store(self, study: str, instances: list[Dataset]) -> None:
        """STOW-RS `instances` into `study` in one request; PacsError unless the PACS stored every one
        (a 2xx with no Failed SOP Sequence)."""
        answer = self._call("store the results", self.client.store_instances, instances, study)
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError(
                f"the PACS rejected {len(failed)} of {len(instances)} result object(s) "
                f"(STOW-RS failure reason {', '.join(reasons)})"
            )

    # --- Every request ------------------------------------------------------------------------

    def _call(self, what: str, operation: Callable, *args, **kwargs):
        """`operation` (a DICOMwebClient method; the session retries it) with its failures as PacsErrors."""
        try:
            return operation(*args, **kwargs)
        except requests.exceptions.SSLError as err:
            raise PacsUnreachable(f"{what}: TLS verification of {self.connection.url} failed ({err})") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            raise self._unreachable(what, err) from None
        except requests.HTTPError as err:  # dicomweb-client's raise_for_status
            raise _status_error(what, err.response) from None
        except (requests.RequestException, ValueError) as err:  # JSON or multipart it cannot parse, a bad UID
            raise PacsError(f"{what}: the PACS's answer could not be read ({type(err).__name__})") from None

    def _unreachable(self, what: str, err: requests.RequestException) -> PacsUnreachable:
        """After the retries ran out, or a failure that was not retried: a POST the PACS may have received,
        or an answer that broke off after its headers every time it was asked for (`PacsSession`)."""
        exhausted = err.args[0] if err.args and isinstance(err.args[0], MaxRetryError) else None
        failure = self._failure(err, exhausted.reason if exhausted else err)
        if exhausted:
            tries = self.connection.retries + 1
            return PacsUnreachable(
                f"{what}: the PACS at {self.connection.url} is unreachable after {tries} tries ({failure})"
            )
        posted = err.request is not None and err.request.method == "POST"
        why = "not sent again: the PACS may have received it" if posted else "its answer broke off"
        return PacsUnreachable(f"{what}: the connection to the PACS at {self.connection.url} failed ({failure}); {why}")

    def _failure(self, err: requests.RequestException, cause: Exception) -> str:
        """What went wrong, in words: a timeout names the limit (--timeout), anything else its type."""
        timeout = TIMEOUT_NAMES.get(type(cause)) or (
            type(cause).__name__ if isinstance(cause, requests.Timeout) else None
        )
        if timeout:
            return f"no answer within {self.connection.timeout_s:g} s: {timeout}"
        return type(err).__name__


def _status_error(what: str, response: requests.Response) -> PacsError:
    status = response.status_code
    if status == 401:
        return PacsAuthError(f"{what}: the PACS refused the credentials (HTTP 401)", status)
    if status == 403:
        return PacsAuthError(f"{what}: the PACS does not allow this user to do that (HTTP 403)", status)
    return PacsError(f"{what}: the PACS answered HTTP {status} {response.reason or ''}".rstrip(), status)


def first_value(item: dict, tag: str, default=None):
    """The first value of `tag` (8 hex digits) in a DICOM JSON object, or `default`."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default
