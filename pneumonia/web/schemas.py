"""What the JSON API takes and answers, as pydantic models: the query parameters, the multipart uploads and
every JSON body. They are written once, here; the OpenAPI document (pneumonia/web/openapi.py) is generated
from them (JSON Schema 2020-12, the dialect of OpenAPI 3.1), and the tests hold the app's answers to it.
Descriptions are the models' docstrings and their fields' `description`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypeAliasType

from pneumonia.serving.card import LabelThresholds
from pneumonia.serving.gate import GateThresholds
from pneumonia.serving.outcomes import GateVerdict
from pneumonia.serving.records import type_adapter
from pneumonia.web.queries import DEFAULT_OVERLAY, NO, OVERLAY_FORMATS, RESULT_FORMS, YES, any_case

NOTICE = "Research tool, not a medical device."
Label = Literal["NORMAL", "PNEUMONIA"]
Notice = Literal[NOTICE]
# What an upload's part may say it is: the app judges a file by its bytes, whatever its part says.
UPLOAD_TYPES = "application/octet-stream, image/jpeg, image/png, image/bmp, image/tiff, application/dicom"
FLAG_PATTERN = any_case(YES + NO)
FLAG_WORDS = ", ".join(f"`{word}`" for word in YES + NO)


def binary(media_type: str, description: str | None = None):
    """A field or body of raw bytes of `media_type`."""
    return Field(description=description, json_schema_extra={"contentMediaType": media_type})


def base64_image(media_type: str, description: str | None = None):
    return Field(
        None, description=description, json_schema_extra={"contentEncoding": "base64", "contentMediaType": media_type}
    )


def built(schema, /, **values) -> dict:
    """An answer's JSON through the document's own model: what the document does not describe fails here
    (a 500 in the tests) rather than reaching a client; fields left out stay out, `null`s stay."""
    adapter = type_adapter(schema)
    return adapter.dump_python(adapter.validate_python(values), mode="json", exclude_unset=True)


# --- requests -------------------------------------------------------------------------------


class PredictQuery(BaseModel):
    gradcam: str = Field(
        "1",
        pattern=FLAG_PATTERN,
        examples=["0", "1"],
        description=f"Whether to render the overlay, one of {FLAG_WORDS} (any case): off, `gradcam_png`/"
        "`gradcam_jpeg` is null. Anything else is a 400.",
    )
    overlay: str = Field(
        DEFAULT_OVERLAY,
        pattern=any_case(OVERLAY_FORMATS),
        examples=["png"],
        description="The overlay's encoding, `jpeg` (the default) or `png` (any case): `png` answers `gradcam_png` "
        "instead of `gradcam_jpeg`: lossless, but several times larger and slower to encode. Anything else is a 400.",
    )
    result: str = Field(
        "json",
        pattern=any_case(RESULT_FORMS),
        examples=["dicom-sr", "dicom"],
        description="What the answer is (any case): `json` (the default), `dicom-sr` (`application/dicom`: the "
        'Structured Report alone) or `dicom` (`multipart/related; type="application/dicom"`: the Secondary '
        "Capture, then the Structured Report; a body that STOW-RS takes as it is, at `studies/{StudyInstanceUID}` "
        "of a PACS). Only for a DICOM upload (anything else is a 415), on a server installed with the pacs extra "
        "(else 501). `gradcam` and `overlay` apply to `json` only. Anything else is a 400.",
    )

    @property
    def with_gradcam(self) -> bool:
        return self.gradcam.lower() in YES

    @property
    def overlay_format(self) -> tuple[str, str]:
        """(the answer's field suffix, the encoder's extension)."""
        return self.overlay.lower(), OVERLAY_FORMATS[self.overlay.lower()]

    @property
    def result_form(self) -> str:
        return self.result.lower()


class BatchQuery(BaseModel):
    gradcam: str = Field(
        "0",
        pattern=FLAG_PATTERN,
        examples=["1"],
        description=f"Whether to add each screened entry's overlay as `gradcam_png` (a Grad-CAM pass and a few hundred "
        f"kB of JSON per file), one of {FLAG_WORDS} (any case). Anything else is a 400.",
    )

    @property
    def with_gradcam(self) -> bool:
        return self.gradcam.lower() in YES


class Upload(BaseModel):
    file: bytes = binary(
        "application/octet-stream",
        "The X-ray: JPEG, PNG, BMP, TIFF or DICOM (judged by its bytes), at most PNEUMONIA_MAX_CONTENT_LENGTH "
        "(default 20 MB).",
    )


class BatchUpload(BaseModel):
    file: list[Annotated[bytes, binary("application/octet-stream")]] = Field(
        min_length=1,
        max_length=100,  # the default PNEUMONIA_BATCH_MAX_FILES; the served document states the server's
        description="One part per X-ray, all named `file`; at most PNEUMONIA_BATCH_MAX_FILES (default 100) and "
        "PNEUMONIA_MAX_CONTENT_LENGTH (default 20 MB) for the whole body.",
    )


# --- answers --------------------------------------------------------------------------------


class Error(BaseModel):
    """Every failure of a request as a whole: a sentence for a person and the HTTP status."""

    error: str = Field(min_length=1)
    status: int = Field(ge=400, le=599)


class OodAccepted(BaseModel):
    """The gate accepted the image; `unusual` adds a `warning` sentence."""

    verdict: Literal[GateVerdict.OK, GateVerdict.UNUSUAL]
    score: float
    thresholds: GateThresholds
    warning: str | SkipJsonSchema[None] = None  # absent, not null, when the verdict is ok


class OodRejected(BaseModel):
    """The gate refused the image: `size`, `shape`, `colour`, `blank` (pixel checks) or `features` (unlike the
    training X-rays)."""

    verdict: Literal[GateVerdict.REJECTED]
    reason: Literal["size", "shape", "colour", "blank", "features"]
    score: float | None
    threshold: float | None


class OodUnchecked(BaseModel):
    """The model has no gate: nothing was checked."""

    verdict: Literal["unchecked"]
    gate: Literal["off"]
    detail: str | None


Ood = TypeAliasType(
    "Ood",
    Annotated[
        OodAccepted | OodRejected | OodUnchecked,
        Field(discriminator="verdict", description="The out-of-distribution gate's verdict."),
    ],
)


class Refused(Error):
    """422: the upload decoded but the out-of-distribution gate says it is not a chest X-ray; no probability,
    no heatmap."""

    status: Literal[422]
    ood: OodRejected


class ModelFacts(BaseModel):
    name: str
    architecture: str
    input_size: int = Field(ge=1)
    validation_auc: float | None


class GradcamFacts(BaseModel):
    layer: str
    map_size: list[int] = Field(min_length=2, max_length=2)
    target: Label
    localised: bool = Field(description="False when Grad-CAM found no positive evidence (an all-zero map).")


class Timing(BaseModel):
    """Milliseconds per step: decoder_wait (for a free decoding child), decode, preprocess, model_gradcam,
    overlay_encode (with an overlay), total."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float] = Field(init=False)
    total: float


class Prediction(BaseModel):
    """One X-ray screened; the overlay as `gradcam_jpeg`, or `gradcam_png` with `?overlay=png`."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["gradcam_png"]}, {"required": ["gradcam_jpeg"]}]}
    )
    probability: float = Field(ge=0, le=1, description="Calibrated probability of PNEUMONIA, exact.")
    probability_text: str = Field(
        description='The probability as a person should read it, e.g. "37.2 %", or capped where the calibration '
        'data stops: "< 1 %", "> 99 %".'
    )
    label: Label
    screening_label: Label
    thresholds: LabelThresholds
    model: ModelFacts
    gradcam: GradcamFacts
    ood: Annotated[OodAccepted | OodUnchecked, Field(discriminator="verdict")]
    gradcam_png: str | None = base64_image("image/png", "With ?overlay=png, instead of gradcam_jpeg.")
    gradcam_jpeg: str | None = base64_image(
        "image/jpeg",
        "The Grad-CAM overlay as base64 JPEG, long side <= 512 px (PNEUMONIA_API_IMAGE_MAX_SIDE); null with "
        "?gradcam=0. Present unless ?overlay=png.",
    )
    timing_ms: Timing
    notice: Notice


class BatchFile(BaseModel):
    index: int = Field(ge=0)
    filename: str = Field(max_length=255)
    notice: Notice


class BatchScreened(BatchFile):
    """A file screened: what POST /api/predict answers, without the model, the Grad-CAM facts and the timings;
    `gradcam_png` with `?gradcam=1`."""

    status: Literal[200]
    probability: float = Field(ge=0, le=1)
    probability_text: str
    label: Label
    screening_label: Label
    thresholds: LabelThresholds
    ood: Ood
    gradcam_png: str | None = base64_image("image/png")


class BatchRefused(BatchFile):
    """A file the gate refused (422), with its verdict."""

    status: Literal[422]
    probability: None
    error: str
    ood: OodRejected


class BatchFailed(BatchFile):
    """A file not screened: 400 empty or unreadable; 415 not an accepted type (refused before any decoder saw
    it); 500 an unexpected failure on that file; 503 the service became too busy before this file's turn (send
    it again)."""

    status: Literal[400, 415, 500, 503]
    probability: None
    error: str


BatchEntry = TypeAliasType(
    "BatchEntry",
    Annotated[
        BatchScreened | BatchRefused | BatchFailed,
        Field(
            description="One file's answer, in upload order. `status` is what POST /api/predict would have "
            "answered for that file alone."
        ),
    ],
)


class Serving(BaseModel):
    runtime: Literal["onnx", "keras"]
    keras_sha256: str | None
    export_sha256: dict[str, str] | None
    note: str | None


class Health(BaseModel):
    status: Literal["ready"]
    ready: Literal[True]
    model: str
    gradcam_layer: str
    gradcam_map_size: list[int] = Field(min_length=2, max_length=2)
    ood_gate: str = Field(description='"on", or "off: <why>".')
    serving: Serving


class NotReady(BaseModel):
    status: Literal["not ready"]
    ready: Literal[False]
    reason: str


class MonitorSignal(BaseModel):
    """One drift signal: the share of the window's values in its band, and the range of shares a window of this
    size shows without drift (its test's acceptance range, at the monitor's false-alarm rate)."""

    name: Literal["unusual_share", "gate_score_above_median", "uncertain_share", "above_default", "above_screening"]
    quantity: Literal["gate_score", "probability"]
    sided: Literal["above", "both"] = Field(description="`above`: only a larger share alarms; `both`: either way.")
    value: float | None = Field(ge=0, le=1, description="The window's share; null while it holds no such value.")
    count: int = Field(ge=0, description="Values of the window in the band.")
    of: int = Field(ge=0, description="Values of the window of this quantity (gate scores, or screened images).")
    expected: list[float] | None = Field(min_length=2, max_length=2, description="[lowest, highest] share expected.")
    reference: float = Field(ge=0, le=1, description="The share on the reference (the card's).")
    alarm: bool


class MonitorReferenceFacts(BaseModel):
    computed_on: str
    images: int


class Monitor(BaseModel):
    """The drift monitor: this worker's recent screenings (numbers only, in memory) against the reference the
    model card carries. Too few images never alarm; a card without a reference answers `signals: []`."""

    alarm: bool
    images: int = Field(ge=0, description="Screenings in the window.")
    window: int = Field(ge=1, description="The most screenings the window keeps (PNEUMONIA_MONITOR_WINDOW).")
    min_images: int = Field(ge=1, description="Below this many the monitor does not alarm.")
    false_alarm_rate: float = Field(description="The chance, at most, that a window without drift alarms.")
    reference: MonitorReferenceFacts | None
    signals: list[MonitorSignal]
    advice: str = Field(min_length=1)
    scope: str


class Document(BaseModel):
    """The OpenAPI 3.1 document."""

    model_config = ConfigDict(extra="allow")
    openapi: str
    info: dict
    paths: dict


DicomReport = Annotated[
    bytes,
    binary(
        "application/dicom",
        "`result=dicom-sr`: the Structured Report as a DICOM Part 10 file (Comprehensive 3D SR holding a TID 1500 "
        "Measurement Report): DCM Probability, each threshold and the label at it, the gate's verdict, the model "
        "(name, version, card sha256), and the uploaded image as evidence; the patient and study identification "
        "copied from the upload, the series described as RESEARCH USE ONLY.",
    ),
]
DicomResults = Annotated[
    bytes,
    binary(
        "multipart/related",
        '`result=dicom`: `multipart/related; type="application/dicom"; boundary=...`, two parts of type '
        "`application/dicom`: the Grad-CAM overlay as a Secondary Capture (RGB, DERIVED\\SECONDARY, its Source "
        "Image Sequence the upload), then the Structured Report. Stored in this order, the SR comes last, as "
        "`pacs screen` stores them.",
    ),
]
