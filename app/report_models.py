"""The report (``findlady.report/2``) as pydantic models, for the OpenAPI document.

The JSON Schema ``findlady_core/schemas/report-2.json`` (served at ``GET /v1/schemas/report``) is
the contract; these models mirror it so that ``/docs`` shows a typed report. Unknown fields are
allowed (format 2 may grow), numbers that were not finite are null.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Num = float | None


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelRef(_Open):
    id: str | None = None
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    name: str | None = None
    version: int | None = None


class SuspectRef(_Open):
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    parameters: int


class SpecRef(_Open):
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="sha256 of the spec's canonical JSON")
    groups: int
    neurons: int


class GroupIntegrity(_Open):
    flagged: int
    rescaled: int
    max_abs_log_norm_ratio: Num = None
    min_cosine: Num = None


class ReportGroup(_Open):
    name: str
    kind: Literal["residual", "mlp", "heads", "dims", "conv", "dense"]
    size: int
    moved: int
    mean_similarity: Num
    min_margin: Num
    mean_margin: Num = None
    ambiguous: int
    log10_p_value: Num = None
    integrity: GroupIntegrity | None = None
    permutation: list[int] | None = Field(None, description="only with ?include=permutations")


class Similarity(_Open):
    statistic: Literal["mean_margin"]
    mean_margin: Num
    null_mean_margin: Num
    threshold: float
    required: Num
    neurons: int
    similar: bool


class Resync(_Open):
    method: str
    groups: list[ReportGroup]
    groups_count: int
    moved: int
    log10_p_value: Num
    similarity: Similarity
    seconds: Num


class Flagged(_Open):
    group: str
    neuron: int
    norm_ratio: Num
    cosine: Num


class Integrity(_Open):
    status: Literal["intact", "modified"]
    tolerance: float
    neurons: int
    flagged: list[Flagged]
    flagged_count: int = Field(description="all flagged neurons; 'flagged' lists the most deviant")
    unpermuted_layers: list[dict[str, object]]
    unpermuted_layers_count: int


class Watermark(_Open):
    scheme: Literal["uchida"]
    bits: int
    bit_errors: int
    bit_errors_before_resync: int | None = Field(description="None when the suspect has another width there")
    p_value: Num
    log10_p_value: Num
    detected: bool
    alpha: float


class Software(_Open):
    name: Literal["findlady"]
    version: str
    solver_version: str


class Report(_Open):
    """A verification report, format 2 (JSON Schema at ``GET /v1/schemas/report``)."""

    format: Literal["findlady.report/2"]
    verdict: Literal["match", "match_modified", "no_match", "inconclusive"]
    reasons: list[str]
    reference: ModelRef
    suspect: SuspectRef
    spec: SpecRef
    resync: Resync
    integrity: Integrity
    watermark: Watermark | None
    timings: dict[str, Num]
    thresholds: dict[str, float | str | None]
    software: Software
    created_at: str


class Signature(BaseModel):
    alg: Literal["Ed25519"]
    key_id: str
    value: str = Field(description="standard base64 (with padding) of the 64-byte signature")


class SignedReport(BaseModel):
    """Signed over json.dumps(report, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()."""

    format: Literal["findlady.signed-report/1"]
    report: Report
    signature: Signature


class SigningKey(BaseModel):
    key_id: str = Field(description="first 16 hex digits of the sha256 of the raw public key")
    alg: Literal["Ed25519"]
    public_key: str = Field(description="standard base64 (with padding) of the 32 raw bytes")


class SigningKeyList(BaseModel):
    keys: list[SigningKey] = Field(description="the current key first, then retired keys still trusted")
