"""docs/service.md lists exactly the service's settings, with their environment names and defaults."""

from __future__ import annotations

import re

from conftest import REPO

from service.config import Settings, settings_table

START, END = "<!-- settings-table: start -->\n", "<!-- settings-table: end -->"


def _documented() -> str:
    text = (REPO / "docs" / "service.md").read_text()
    return text[text.index(START) + len(START) : text.index(END)]


def test_settings_table_in_docs_is_current():
    assert _documented() == settings_table(), (
        "docs/service.md's settings table is stale: replace it with the output of "
        "`python -c 'from service.config import settings_table; print(settings_table(), end=\"\")'`"
    )


def test_settings_table_names_every_field_once():
    names = re.findall(r"^\| `(TTASEG_[A-Z0-9_]+)` \|", _documented(), flags=re.MULTILINE)
    assert names == [f"TTASEG_{field.upper()}" for field in Settings.model_fields]
