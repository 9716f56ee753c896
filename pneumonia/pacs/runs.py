"""One run against a PACS, and `watch`'s polling of such runs:

    QIDO-RS: the instances of the filters (modality CR, DX; studies, study date, body part, view)
    ──per study──> which of them already have this model's SR (asked of the PACS, unless --force)
    ──per image──> WADO-RS ──> the one screening pipeline (gate and Grad-CAM) ──> SR + Secondary Capture
    ──> STOW-RS into the image's study, in the run's new series: the Secondary Capture, then the SR

Nothing is kept locally between runs: what is done is what the PACS holds, and the SR is the mark of
"done". So it is stored last, in a request of its own, once its Secondary Capture is in: an image whose
SR did not go in is a failed row and is redone by the next run (a capture stored without its SR stays,
unreferenced, and the redo brings another). An image the gate refuses,
one that cannot be read and one the PACS would not store are rows with their error; an unreachable PACS
or refused credentials end the run (`PacsUnreachable`, `PacsAuthError`). Rows name images by their UIDs
only; nothing of the patient is printed, logged or written here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from pneumonia.errors import XrayReadError
from pneumonia.pacs.dicomweb import DicomWeb, PacsAuthError, PacsError, PacsUnreachable, first_value
from pneumonia.pacs.reports import (
    GRADCAM_SIDE,
    SOURCE_KEYWORDS,
    ModelIdentity,
    RunSeries,
    UnreferableImage,
    reference_from_header,
    referenced_instances,
    result_objects,
)
from pneumonia.serving.outcomes import Outcome
from pneumonia.serving.screening import BatchScreener, ScreenedImage, Screening, Tally

STUDY, SERIES, INSTANCE, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
HEADER_KEYWORDS = (*SOURCE_KEYWORDS, "BodyPartExamined", "ViewPosition")  # what a run reads of an image's header
BODY_PART, VIEW, SERIES_DESCRIPTION = "00180015", "00185101", "0008103E"
INCLUDED = (STUDY, SERIES, INSTANCE, SOP_CLASS, "00080060", BODY_PART, VIEW)


@dataclass(frozen=True)
class Filters:
    """Which images a run looks at. Body part and view are matched where the PACS reports them
    (the QIDO answer, else the image's own header); an image without the attribute passes."""

    studies: tuple[str, ...] = ()
    since: str | None = None  # YYYYMMDD: studies on or after
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ()
    views: tuple[str, ...] = ()

    def admits(self, body_part: str | None, view: str | None) -> bool:
        def fits(value, allowed):
            return not allowed or not value or str(value).upper() in {a.upper() for a in allowed}

        return fits(body_part, self.body_parts) and fits(view, self.views)


@dataclass(frozen=True)
class Candidate:
    study: str
    series: str
    instance: str


SKIPPED = "skipped"  # the outcome a PACS run adds: this model's result is already in the PACS


@dataclass
class PacsRow:
    """One image of a run, its status the outcome of its screening: screened (and stored), skipped (the
    PACS has this model's result), refused (by the gate), failed (unreadable, or not fetched or stored)."""

    candidate: Candidate
    screened: ScreenedImage
    stored: tuple[str, str] = ("", "")  # SOP Instance UIDs of the SR and the Secondary Capture

    @property
    def status(self) -> str:
        return self.screened.outcome


@dataclass
class RunTally(Tally):
    """A run's images by status: a screening's outcomes, and skipped."""

    skipped: int = 0

    def summary(self) -> str:
        counts = {
            Outcome.SCREENED: self.screened,
            SKIPPED: self.skipped,
            Outcome.REFUSED: self.refused,
            Outcome.FAILED: self.failed,
        }
        return f"{self.files} image(s): " + ", ".join(f"{count} {status}" for status, count in counts.items())


def failed_row(candidate: Candidate, error: str) -> PacsRow:
    return PacsRow(candidate, ScreenedImage(candidate.instance, Screening.failed(error)))


def find_candidates(pacs: DicomWeb, filters: Filters) -> list[Candidate]:
    """QIDO-RS for each modality (and each study asked for): the matching instances, once each."""
    found: dict[str, Candidate] = {}
    for modality in filters.modalities:
        query = {"Modality": modality, **({"StudyDate": f"{filters.since}-"} if filters.since else {})}
        for study in filters.studies or (None,):
            for item in pacs.search_instances(study, query, INCLUDED):
                uids = [first_value(item, tag) for tag in (STUDY, SERIES, INSTANCE)]
                if None in uids or not filters.admits(first_value(item, BODY_PART), first_value(item, VIEW)):
                    continue
                found.setdefault(uids[2], Candidate(*uids))
    return sorted(found.values(), key=lambda c: (c.study, c.series, c.instance))


def screened_instances(pacs: DicomWeb, identity: ModelIdentity, study: str) -> set[str]:
    """The instances of `study` this model's SRs already report on: the PACS is the only record."""
    done = set()
    for series in pacs.search_series(study, {"Modality": "SR"}, (SERIES_DESCRIPTION,)):
        uid = first_value(series, SERIES)
        if uid and first_value(series, SERIES_DESCRIPTION) == identity.series_description("result"):
            done |= referenced_instances(pacs.series_metadata(study, uid))
    return done


def _text(value: str | list[str] | None) -> str | None:
    """A header value as the filters compare it: text, the first of several."""
    return value[0] if isinstance(value, list) and value else value or None


class PacsScreener:
    """Screens a PACS's images with one classifier and stores the results back into it."""

    def __init__(self, pacs: DicomWeb, classifier, force: bool = False):
        self.pacs, self.force = pacs, force
        self.batch = BatchScreener(classifier)
        self.identity = ModelIdentity.of(classifier)

    def run(self, filters: Filters) -> Iterator[PacsRow]:
        """One run: a row per candidate image, in study order. Raises PacsUnreachable / PacsAuthError."""
        candidates = find_candidates(self.pacs, filters)
        done: dict[str, set[str]] = {}
        series: dict[str, RunSeries] = {}
        for candidate in candidates:
            if candidate.study not in done:
                done[candidate.study] = (
                    set() if self.force else screened_instances(self.pacs, self.identity, candidate.study)
                )
            if candidate.instance in done[candidate.study]:
                yield PacsRow(candidate, ScreenedImage(candidate.instance, Screening(SKIPPED)))
                continue
            row = self.screen_one(candidate, filters, series.setdefault(candidate.study, RunSeries.new()))
            if row is not None:
                yield row

    def screen_one(self, candidate: Candidate, filters: Filters, series: RunSeries) -> PacsRow | None:
        """Fetch, screen, store one image; None when its header shows the filters leave it out. Its header
        and its pixels are read in the decoding sandbox: a hostile file is its own row's error."""
        try:
            data = self.pacs.retrieve_instance(candidate.study, candidate.series, candidate.instance)
        except (PacsUnreachable, PacsAuthError):
            raise
        except PacsError as err:
            return failed_row(candidate, str(err))
        try:
            header = self.batch.sandbox.dicom_header(data, HEADER_KEYWORDS, f"image {candidate.instance}")
        except XrayReadError as err:  # not DICOM, or past a limit of the sandbox
            return failed_row(candidate, str(err))
        if not filters.admits(_text(header.get("BodyPartExamined")), _text(header.get("ViewPosition"))):
            return None
        try:
            source = reference_from_header(header)
        except UnreferableImage as err:
            return failed_row(candidate, str(err))
        row = self.batch.screen_chunk([(candidate.instance, data)], GRADCAM_SIDE, with_gradcam=True)[0]
        del data
        if row.outcome != Outcome.SCREENED:
            return PacsRow(candidate, row)
        return self._store(candidate, source, row, series)

    def _store(self, candidate: Candidate, source, row: ScreenedImage, series: RunSeries) -> PacsRow:
        """The Grad-CAM Secondary Capture, then the SR (what marks the image done), one STOW-RS request
        each: the PACS never holds the SR without its capture."""
        sr, capture = result_objects(self.identity, source, row, series)
        row.heat = row.display = None
        stored = ""
        try:
            self.pacs.store(candidate.study, [capture])
            stored = capture.SOPInstanceUID
            self.pacs.store(candidate.study, [sr])
        except (PacsUnreachable, PacsAuthError):
            raise
        except PacsError as err:
            done = "its Grad-CAM image went in, its SR did not (the next run redoes it): " if stored else ""
            # Failed in this run, the probability kept: the CSV row shows what was not stored.
            row.screening = replace(
                row.screening, outcome=Outcome.FAILED, error=f"Screened but not stored: {done}{err}"
            )
            return PacsRow(candidate, row, ("", stored))
        return PacsRow(candidate, row, (sr.SOPInstanceUID, capture.SOPInstanceUID))


def watch(
    run_once: Callable[[], int],
    interval_s: float,
    max_runs: int | None,
    until: datetime | None,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = datetime.now,
) -> int:
    """`run_once` (an exit status) every `interval_s` until `max_runs` runs or the time `until`;
    the worst status of the runs. What `run_once` raises ends the watch."""
    worst, runs = 0, 0
    while (max_runs is None or runs < max_runs) and (until is None or now() < until):
        worst = max(worst, run_once())
        runs += 1
        if max_runs is not None and runs >= max_runs:
            break
        wait = interval_s if until is None else min(interval_s, max(0.0, (until - now()).total_seconds()))
        sleep(wait)
    return worst
