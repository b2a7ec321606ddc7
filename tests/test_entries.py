"""Every shipped entry validates, and the catalog covers the awesome list exactly once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from catalog.entries import ENTRIES_DIR, SCHEMA_LINE, entry_files, load_all
from catalog.schema import SCHEMA_PATH, json_schema_text

SEED = Path(__file__).with_name("data") / "seed_papers.yaml"


@pytest.fixture(scope="module")
def entries():
    loaded, problems = load_all()
    assert problems == [], "\n".join(map(str, problems))
    return {e.id: e for e in loaded}


def test_every_shipped_entry_validates(entries):
    assert len(entries) == len(entry_files())


def test_every_entry_references_the_json_schema():
    for path in entry_files():
        assert path.read_text().splitlines()[0] == SCHEMA_LINE, path


def test_json_schema_file_is_up_to_date():
    assert SCHEMA_PATH.read_text() == json_schema_text()


def test_catalog_has_78_papers_across_the_list_taxonomy(entries):
    assert len(entries) == 78
    categories = {e.category for e in entries.values()}
    assert categories == {
        "overview", "depth", "channel", "spatial", "resolution", "transformer", "dynamic_weights",
        "quantization", "moe", "video",
    }
    assert [e.id for e in entries.values() if e.category == "overview"] == ["dynamic_nn_survey"]


def test_paper_listed_twice_is_one_entry_with_also_in(entries):
    sr = entries["multi_dim_dynamic_sr"]
    assert sr.category == "channel" and sr.taxonomy.also_in == ["resolution"]


def test_every_paper_of_the_list_is_present_once_with_its_identifiers(entries):
    seed = yaml.safe_load(SEED.read_text())
    assert len(seed) == 78
    assert sorted(p["id"] for p in seed) == sorted(entries)
    for fact in seed:
        entry = entries[fact["id"]]
        if fact.get("arxiv"):
            assert entry.paper.arxiv == str(fact["arxiv"]), entry.id
        else:
            assert entry.paper.url, entry.id


def test_entries_are_not_implemented_without_a_module(entries):
    for entry in entries.values():
        impl = entry.implementation
        assert (impl.status == "planned") == (impl.module is None), entry.id


def test_reported_claims_carry_a_source_and_unit(entries):
    for entry in entries.values():
        for claim in entry.reported:
            assert claim.source.strip() and claim.unit.strip(), entry.id


def test_file_names_follow_the_one_name_rule():
    for path in ENTRIES_DIR.rglob("*.yaml"):
        assert re.fullmatch(r"[a-z][a-z0-9_]+", path.stem), path
