"""Routing rules: which model, adaptation method and domain a study pushed over STOW-RS is run with.

Rules come from a YAML or JSON file (``Settings.routing_rules``): a list, tried in order, of

.. code-block:: yaml

    - client: alice                 # optional: only studies this client pushed
      match:                        # every key must match the header of one of the study's series
        Modality: MR                # plain values match exactly (case-insensitive)
        SeriesDescription: "(?i)lge|late.*enh"   # values of *Description, *Name keys are regular expressions
      model: cardiac-bssfp
      adaptation: mpl
      domain: site-a                # optional: default the site key of the headers (:func:`site_domain`)

The first rule one of whose series matches wins, and that series' headers give the domain. A study no rule
matches is not guessed at: it stays ``unrouted``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from models.terms import Method
from service.schemas import DOMAIN_PATTERN, MODEL_PATTERN

REGEX_SUFFIXES = ("Description", "Name")
SITE_KEYWORDS = ("InstitutionName", "Manufacturer", "ManufacturerModelName", "StationName")


class Rule(BaseModel):
    """One routing rule."""

    model_config = ConfigDict(extra="forbid")

    client: str | None = None
    match: dict[str, str] = Field(default_factory=dict)
    model: str = Field(pattern=MODEL_PATTERN)
    adaptation: Method = Method.NONE
    domain: str | None = Field(None, pattern=DOMAIN_PATTERN)


@dataclass(frozen=True)
class Route:
    """Where a study goes: model, adaptation method and domain key."""

    model: str
    adaptation: Method
    domain: str


def load_rules(path: Path) -> list[Rule]:
    """The rules of a YAML or JSON file (ValueError when malformed)."""
    text = Path(path).read_text()
    data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    return TypeAdapter(list[Rule]).validate_python(data or [])


def site_domain(header: pydicom.Dataset) -> str:
    """Domain key of a scanner: a slug of institution, manufacturer, model and station plus a short digest."""
    values = [str(header.get(k, "") or "").strip() for k in SITE_KEYWORDS]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", "-".join(v for v in values if v)).strip("-").lower()[:48]
    digest = hashlib.sha256("\\".join(values).encode()).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else f"site-{digest}"


def _matches(rule: Rule, header: pydicom.Dataset) -> bool:
    for keyword, expected in rule.match.items():
        value = str(header.get(keyword, "") or "")
        if keyword.endswith(REGEX_SUFFIXES):
            if re.search(expected, value) is None:
                return False
        elif value.strip().lower() != expected.strip().lower():
            return False
    return True


def route(rules: list[Rule], client_id: str, series_dirs: list[Path]) -> Route | None:
    """The route of a client's study (its series folders), or None when no rule matches."""
    headers = []
    for folder in series_dirs:
        first = min(folder.glob("*.dcm"), default=None)
        if first is not None:
            headers.append(pydicom.dcmread(first, stop_before_pixels=True))
    for rule in rules:
        if rule.client not in (None, client_id):
            continue
        for header in headers:
            if _matches(rule, header):
                return Route(rule.model, rule.adaptation, rule.domain or site_domain(header))
    return None
