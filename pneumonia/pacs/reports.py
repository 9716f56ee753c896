"""A screened X-ray's result as DICOM objects for its own study (built with highdicom):

  * a Comprehensive 3D SR holding a TID 1500 Measurement Report: the device observer is the model
    (its UID derived from the card's fingerprint), procedure "Chest imaging", one measurement group
    (TID 1501) for the image, with the algorithm (TID 4019: name, version, the thresholds and the card
    fingerprint as parameters), the source image, the finding type Pneumonia, the calibrated
    probability and each threshold as measurements, and as qualitative evaluations the finding at the
    default threshold, the label at each threshold and the out-of-distribution gate's verdict;
  * a Secondary Capture of the Grad-CAM overlay, DERIVED\\SECONDARY, referencing the source image.

Both copy from the source only what their modules require (patient and study identification, via
highdicom's `from_ref_dataset` / SR evidence). Their series descriptions say "RESEARCH USE ONLY" and
carry the model's name and fingerprint: that is how a later run finds what this model already did.
`pacs screen` stores them; the web app answers them for a DICOM upload (pneumonia/web/dicom_results.py).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumonia.labels import PNEUMONIA
from pneumonia.serving.result_formats import result_values

MANUFACTURER = "pneumonia screening (research use only, not a medical device)"
PRIVATE_SCHEME = "99PNEUMONIA"  # a private coding scheme (PS3.16 8.2: "99" prefix) for what has no code
PNEUMONIA_CODE = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
NORMAL_CODE = codes.SCT.Normal
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
GRADCAM_SIDE = 1024  # long side of the Secondary Capture, as the overlays of `predict --gradcam`


# What the results copy from the source: the Patient and General Study modules' identification (Type 1
# and 2, empty when the source lacks them) and the image's own UIDs; nothing else of the source.
COPIED_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


# What a result must reference: the image's study, series and instance (Type 1 in every image IOD).
REQUIRED_FROM_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")
# Every element of the source a result reads (`reference_dataset`): what the decoding sandbox hands out of a header.
SOURCE_KEYWORDS = tuple(dict.fromkeys((*COPIED_FROM_SOURCE, *REQUIRED_FROM_SOURCE, "PatientOrientation")))


class UnreferableImage(ValueError):
    """A DICOM image without the UIDs its results must reference."""


# Value representations whose invalid values highdicom refuses (a PatientBirthDate of 99999999 raised
# its ValueError) or that would be copied into the results as they are (an invalid StudyInstanceUID).
CHECKED_VRS = ("DA", "TM", "UI")


def invalid_elements(source: Dataset, keywords) -> list[str]:
    """The keywords among `keywords` whose value in `source` is not valid for its DA, TM or UI VR."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    invalid = []
    for keyword in keywords:
        element = source[keyword] if keyword in source else None
        if element is None or not element.value or element.VR not in CHECKED_VRS:
            continue
        try:
            validate_value(element.VR, element.value, config.RAISE)
        except ValueError:
            invalid.append(keyword)
    return invalid


def reference_dataset(source: Dataset) -> Dataset:
    """The source's identifiers the SR and the Secondary Capture must carry, and its UIDs;
    UnreferableImage when it lacks one of REQUIRED_FROM_SOURCE or one of them is invalid (the value
    is not quoted: it may identify the patient)."""
    missing = [keyword for keyword in REQUIRED_FROM_SOURCE if not source.get(keyword)]
    if missing:
        raise UnreferableImage(
            f"The DICOM image has no {', '.join(missing)}: there is nothing its results could reference."
        )
    invalid = invalid_elements(source, (*COPIED_FROM_SOURCE, *REQUIRED_FROM_SOURCE))
    if invalid:
        raise UnreferableImage(
            f"The DICOM image's {', '.join(invalid)} is not a valid DICOM value: its results cannot carry it."
        )
    reference = Dataset()
    for keyword in COPIED_FROM_SOURCE:
        setattr(reference, keyword, source.get(keyword, "") or "")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
        setattr(reference, keyword, source[keyword].value)
    orientation = list(source.get("PatientOrientation", None) or [])
    if len(orientation) == 2:
        reference.PatientOrientation = orientation
    return reference


def reference_from_header(values: dict[str, str | list[str]]) -> Dataset:
    """`reference_dataset` of an image whose header the decoding sandbox read (`DecodingSandbox.dicom_header`
    with SOURCE_KEYWORDS): the values, as text, set on a dataset; UnreferableImage as there."""
    source = Dataset()
    for keyword, value in values.items():
        setattr(source, keyword, value)
    return reference_dataset(source)


def private_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning)


@dataclass(frozen=True)
class ModelIdentity:
    """What names the model in the PACS: its card's name, the weights' sha256 (the version) and the
    card's fingerprint (sha256 of its canonical JSON: calibration and thresholds included)."""

    name: str
    version: str
    fingerprint: str
    thresholds: dict[str, float]

    @classmethod
    def of(cls, classifier) -> ModelIdentity:
        card_json = json.dumps(classifier.card.to_dict(), sort_keys=True, default=str)
        fingerprint = hashlib.sha256(card_json.encode()).hexdigest()
        return cls(classifier.card.name, classifier.keras_sha256[:16], fingerprint, dict(classifier.thresholds))

    @property
    def device_uid(self) -> str:
        return "2.25." + str(int(self.fingerprint[:32], 16))

    def series_description(self, kind: str) -> str:
        """ "RESEARCH USE ONLY pneumonia <kind> <name> <fingerprint[:8]>", at most 64 characters (LO)."""
        return f"RESEARCH USE ONLY pneumonia {kind} {self.name[:20]} {self.fingerprint[:8]}"[:64]


@dataclass
class RunSeries:
    """The new series of one run in one study: one for the SRs, one for the Secondary Captures."""

    sr_uid: str
    sc_uid: str
    count: int = 0

    @classmethod
    def new(cls) -> RunSeries:
        return cls(generate_uid(), generate_uid())


def _group(identity: ModelIdentity, source: Dataset, row) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the image's probability, thresholds, labels and the gate's verdict."""
    thresholds = identity.thresholds
    parameters = [f"threshold_{key}={value:.6f}" for key, value in thresholds.items()]
    algorithm = hd.sr.AlgorithmIdentification(
        identity.name, identity.version, parameters=[*parameters, f"card_sha256={identity.fingerprint}"]
    )
    values = result_values(row, thresholds, gated=row.verdict is not None)  # a screened row: a verdict when gated
    measurements = [hd.sr.Measurement(codes.DCM.Probability, values["probability"], NO_UNITS, algorithm_id=algorithm)]
    for key in thresholds:
        name = private_code(f"threshold-{key}", f"Threshold {key}")
        measurements.append(hd.sr.Measurement(name, values[f"threshold_{key}"], NO_UNITS, algorithm_id=algorithm))
    finding = PNEUMONIA_CODE if values["label_default"] == PNEUMONIA else NORMAL_CODE
    evaluations = [hd.sr.QualitativeEvaluation(codes.DCM.Finding, finding)]
    for key in thresholds:
        value = PNEUMONIA_CODE if values[f"label_{key}"] == PNEUMONIA else NORMAL_CODE
        evaluations.append(
            hd.sr.QualitativeEvaluation(private_code(f"label-{key}", f"Label at {key} threshold"), value)
        )
    verdict = values["ood_verdict"]
    evaluations.append(
        hd.sr.QualitativeEvaluation(
            private_code("ood-gate", "Out-of-distribution gate verdict"), private_code(f"ood-{verdict}", verdict)
        )
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="pneumonia screening"),
        finding_type=PNEUMONIA_CODE,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def structured_report(identity: ModelIdentity, source: Dataset, row, series: RunSeries) -> Dataset:
    """The SR of one screened image (`row` has a probability), for the source's study."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=identity.device_uid,
        name=identity.name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{identity.name} {identity.version}"[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device),
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ChestImaging,
        imaging_measurements=[_group(identity, source, row)],
    )
    series.count += 1
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        **_new_instance(series.sr_uid, SR_SERIES_NUMBER, series),
        is_complete=True,
        series_description=identity.series_description("result"),
    )
    return sr


def _new_instance(series_uid: str, series_number: int, series: RunSeries) -> dict:
    """What both result objects say of their series and of themselves: a new instance, numbered in the run."""
    return {
        "series_instance_uid": series_uid,
        "series_number": series_number,
        "sop_instance_uid": generate_uid(),
        "instance_number": series.count,
        "manufacturer": MANUFACTURER,
    }


def gradcam_capture(identity: ModelIdentity, source: Dataset, rgb: np.ndarray, series: RunSeries) -> Dataset:
    """The Grad-CAM overlay (uint8 (H, W, 3) RGB) as a Secondary Capture in the source's study."""
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # replaced below by the source's, or left empty (Type 2)
        **_new_instance(series.sc_uid, SC_SERIES_NUMBER, series),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=identity.series_description("Grad-CAM"),
    )
    image.ImageType = ["DERIVED", "SECONDARY", "GRADCAM"]
    image.DerivationDescription = f"Grad-CAM of {identity.name} over the X-ray; research use only"
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    image.SourceImageSequence = [reference]
    image.BurnedInAnnotation = "NO"
    image.PatientOrientation = source.get("PatientOrientation", "")
    return image


def result_objects(
    identity: ModelIdentity, source: Dataset, row, series: RunSeries, alpha: float = 0.5
) -> tuple[Dataset, Dataset]:
    """The SR and the Grad-CAM Secondary Capture of a screened `row` (its probability, display copy and heat map)."""
    from pneumonia.serving.gradcam import overlay

    sr = structured_report(identity, source, row, series)
    capture = gradcam_capture(identity, source, overlay(row.display, row.heat, alpha)[..., ::-1], series)
    return sr, capture


def part10(dataset: Dataset) -> bytes:
    """`dataset` as a DICOM Part 10 file, in memory."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def referenced_instances(metadata: list[dict]) -> set[str]:
    """The SOP Instance UIDs the SRs of a series' metadata (DICOM JSON) report on: their Current
    Requested Procedure Evidence Sequence (0040,A375) > Referenced Series (0008,1115) > Referenced SOP (0008,1199)."""
    found = set()
    for instance in metadata:
        for study in (instance.get("0040A375") or {}).get("Value") or []:
            for series in (study.get("00081115") or {}).get("Value") or []:
                for sop in (series.get("00081199") or {}).get("Value") or []:
                    found.update((sop.get("00081155") or {}).get("Value") or [])
    return found
