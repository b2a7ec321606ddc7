"""Entry model (Contract 1): pydantic, unknown fields rejected, closed vocabularies from ``vocab``.

An entry is one YAML file ``catalog/entries/<category>/<id>.yaml``. File-level rules (id equals the
stem, category equals the folder, ids unique, the implementation file exists) need the path and are
checked by ``catalog.entries``; everything that one file can say about itself is checked here.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from catalog import vocab

SCHEMA_PATH = Path(__file__).with_name("entry.schema.json")
MIN_YEAR, MAX_YEAR = 1980, _dt.date.today().year + 1

ID_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
ARXIV_RE = re.compile(r"^(\d{4}\.\d{4,5}|[a-z][a-z.-]+(\.[A-Z]{2})?/\d{7})$")
DOI_RE = re.compile(r"^10\.\d{4,9}/[^\s<>\"]+$")
URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d+)?(/[^\s<>\"]*)?$")
HTML_RE = re.compile(r"<\s*/?\s*[A-Za-z!?]|&#|javascript:|data:text/html", re.IGNORECASE)
MODULE_RE = re.compile(r"^implementations/[a-z_]+/[a-z][a-z0-9_]*\.py$")


def _literal(words: dict[str, str] | tuple[str, ...]) -> Any:
    return Literal[tuple(words)]  # type: ignore[valid-type]


Category = _literal(vocab.CATEGORIES)
Granularity = _literal(vocab.GRANULARITIES)
Decision = _literal(vocab.DECISIONS)
Training = _literal(vocab.TRAININGS)
Tag = _literal(vocab.TAGS)
Status = _literal(vocab.IMPLEMENTATION_STATUSES)
SpeedupClaim = _literal(vocab.SPEEDUP_CLAIMS)
Quantity = _literal(vocab.QUANTITIES)
Framework = _literal(vocab.FRAMEWORKS)


def _strict_str(value: Any) -> Any:
    """YAML turns unquoted ``1709.01686`` or ``2016`` into numbers; say so instead of coercing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"must be a quoted string (YAML read {value!r} as a number; write '{value}')")
    return value


def _no_html(value: str) -> str:
    if HTML_RE.search(value):
        raise ValueError("HTML, character references and script URLs are not allowed in text fields")
    return value


def _one_line(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError("must be a single line")
    if "|" in value:
        raise ValueError("must not contain '|' (it would break the site's tables)")
    return value


def _url(value: str) -> str:
    if not URL_RE.match(value):
        raise ValueError(f"must be an http(s) URL without spaces, got {value!r}")
    return value


def _arxiv(value: str) -> str:
    if not ARXIV_RE.match(value):
        raise ValueError(f"not an arXiv id (expected e.g. '1711.11503' without version), got {value!r}")
    return value


def _doi(value: str) -> str:
    if not DOI_RE.match(value):
        raise ValueError(f"not a DOI (expected '10.<registrant>/<suffix>'), got {value!r}")
    return value


def _entry_id(value: str) -> str:
    if not ID_RE.match(value):
        raise ValueError("must be snake_case: a lowercase letter, then lowercase letters, digits or '_' (2-64)")
    return value


def _module_path(value: str) -> str:
    if ".." in value.split("/") or not MODULE_RE.match(value):
        raise ValueError(
            f"must be a path inside implementations/, like 'implementations/depth/skipnet.py', got {value!r}"
        )
    return value


Text = Annotated[str, BeforeValidator(_strict_str), Field(min_length=1), AfterValidator(_no_html)]
Line = Annotated[str, BeforeValidator(_strict_str), Field(min_length=1, max_length=300),
                 AfterValidator(_no_html), AfterValidator(_one_line)]
Url = Annotated[str, BeforeValidator(_strict_str), AfterValidator(_url)]
ArxivId = Annotated[str, BeforeValidator(_strict_str), AfterValidator(_arxiv)]
Doi = Annotated[str, BeforeValidator(_strict_str), AfterValidator(_doi)]
EntryId = Annotated[str, BeforeValidator(_strict_str), AfterValidator(_entry_id)]
ModulePath = Annotated[str, BeforeValidator(_strict_str), AfterValidator(_module_path)]
Year = Annotated[int, Field(ge=MIN_YEAR, le=MAX_YEAR, strict=True)]
Knob = bool | int | float | Annotated[str, AfterValidator(_no_html)] | list[int | float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paper(Strict):
    """Where to read the paper: an arXiv id and/or a stable URL, optionally a DOI."""

    arxiv: ArxivId | None = None
    url: Url | None = None
    doi: Doi | None = None

    @model_validator(mode="after")
    def _has_link(self) -> Paper:
        if not self.arxiv and not self.url:
            raise ValueError("needs an arxiv id or a url")
        return self

    @property
    def link(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else str(self.url)


class Code(Strict):
    url: Url
    official: bool
    framework: Framework


class Taxonomy(Strict):
    category: Category
    subcategory: str | None = None
    also_in: list[Category] = []
    granularity: Granularity
    decision: Decision
    training: list[Training] = Field(min_length=1)
    tags: list[Tag] = []

    @model_validator(mode="after")
    def _consistent(self) -> Taxonomy:
        allowed = vocab.SUBCATEGORIES[self.category]
        if self.subcategory is not None and self.subcategory not in allowed:
            choices = ", ".join(allowed) or "none (leave it out)"
            raise ValueError(f"subcategory {self.subcategory!r} is not one of {choices} for '{self.category}'")
        if self.category in self.also_in:
            raise ValueError("also_in must not repeat the primary category")
        return self


class RealSpeedup(Strict):
    """What the paper says about wall-clock speed (not what we measured)."""

    status: SpeedupClaim
    note: Text | None = None


class Reported(Strict):
    """One headline claim of the paper, with its source; always labelled as reported, never measured."""

    claim: Text
    source: Line = Field(description="where in the paper: 'abstract', 'Table 2', 'Figure 4', ...")
    dataset: Line | None = None
    backbone: Line | None = None
    metric: Line
    value: float | int | str
    unit: Line = Field(description="the unit exactly as printed in the paper")
    interpreted_as: Quantity

    @model_validator(mode="after")
    def _value_text(self) -> Reported:
        if isinstance(self.value, str):
            _no_html(self.value)
            _one_line(self.value)
        return self


class Correction(Strict):
    """A fact that the awesome list gives differently from the paper's own record."""

    field: Literal["title", "venue", "year", "authors", "link", "category"]
    listed: Text
    corrected: Text
    source: Url


class Verification(Strict):
    confidence: Literal["high", "medium", "low"]
    sources: list[Url] = Field(min_length=1)
    unconfirmed: list[Text] = []


class OperatingPoint(Strict):
    name: Annotated[str, AfterValidator(_entry_id)]
    knobs: dict[Annotated[str, AfterValidator(_entry_id)], Knob]
    source: Line = Field(description="where the setting comes from: 'paper, Table 1' or 'ours: ...'")


class Implementation(Strict):
    status: Status
    module: ModulePath | None = None
    kernels: list[Literal[
        "sparse_conv2d", "block_conv2d", "routed_linear", "gather_tokens", "scatter_tokens",
        "pack_tokens", "unpack_tokens", "packed_attention", "sliced_conv2d", "sliced_linear",
    ]] = []
    operating_points: list[OperatingPoint] = []
    deviations: list[Text] = []

    @model_validator(mode="after")
    def _module_when_implemented(self) -> Implementation:
        if self.status != "planned" and not self.module:
            raise ValueError(f"status '{self.status}' needs a module path")
        if self.status != "planned" and not self.operating_points:
            raise ValueError(f"status '{self.status}' needs at least one operating point")
        return self


class Entry(Strict):
    """One paper of the awesome list (Contract 1)."""

    id: EntryId
    title: Line
    authors: list[Line] = Field(min_length=1)
    year: Year
    venue: Line
    paper: Paper
    code: list[Code] = []
    taxonomy: Taxonomy
    summary: Text = Field(min_length=80, description="what the method does, in our own words")
    real_speedup_reported: RealSpeedup
    reported: list[Reported] = []
    corrections: list[Correction] = []
    verification: Verification
    implementation: Implementation

    @property
    def category(self) -> str:
        return self.taxonomy.category


def json_schema() -> dict:
    """The JSON Schema editors use to validate entries while a contributor types."""
    schema = Entry.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://dynamic-networks-catalog/entry.schema.json"
    schema["title"] = "Dynamic Networks Catalog entry"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
