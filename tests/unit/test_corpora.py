"""Corpora: lookup tables a deployment names for its plugins, read from a file beside the spec by
`liveloop config publish` into the spec's rows (so they are versioned with the revision), checked
(the key column present and unique), and handed to that deployment's plugins only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libs.cli.corpus_files import resolve_corpus_files
from libs.common.deployment_spec import deployment_spec_from_mapping
from libs.common.errors import InvalidArgument
from libs.policy.deployment import PreparedDeployment

pytestmark = pytest.mark.timeout(30)

SPEC = """
name: with-catalog
offers: [{id: a}, {id: b}]
corpora:
  catalog: {key: offer, file: catalog.csv}
  regions: {key: code, rows: [{code: n, name: North}]}
"""


def test_a_corpus_file_is_read_into_rows_with_numbers_as_numbers(tmp_path: Path) -> None:
    (tmp_path / "catalog.csv").write_text("offer,margin,label\na,4.5,Gold\nb,2,\n")
    resolved = resolve_corpus_files(SPEC, tmp_path / "spec.yaml")
    assert resolved is not None
    document = json.loads(resolved)
    catalog = document["corpora"]["catalog"]
    assert "file" not in catalog
    assert catalog["rows"] == [
        {"offer": "a", "margin": 4.5, "label": "Gold"},
        {"offer": "b", "margin": 2, "label": None},
    ]
    assert catalog["source"].startswith("catalog.csv sha256:")
    assert document["corpora"]["regions"] == {"key": "code", "rows": [{"code": "n", "name": "North"}]}

    spec = deployment_spec_from_mapping(document)
    corpora = PreparedDeployment.prepare(spec).plugins.corpora
    assert corpora["catalog"]["a"]["margin"] == 4.5
    assert corpora["regions"]["n"]["name"] == "North"
    with pytest.raises(TypeError):
        corpora["catalog"]["a"]["margin"] = 0  # type: ignore[index]  # read-only

    # A changed file is a different spec: a new revision.
    (tmp_path / "catalog.csv").write_text("offer,margin\na,5\nb,2\n")
    assert resolve_corpus_files(SPEC, tmp_path / "spec.yaml") != resolved


def test_json_and_json_lines_files_and_specs_without_files(tmp_path: Path) -> None:
    (tmp_path / "catalog.json").write_text('[{"offer": "a", "margin": 1}]')
    (tmp_path / "catalog.jsonl").write_text('{"offer": "a", "margin": 1}\n\n{"offer": "b", "margin": 2}\n')
    for name, count in (("catalog.json", 1), ("catalog.jsonl", 2)):
        resolved = resolve_corpus_files(SPEC.replace("catalog.csv", name), tmp_path / "spec.yaml")
        assert resolved is not None
        assert len(json.loads(resolved)["corpora"]["catalog"]["rows"]) == count
    assert resolve_corpus_files("name: plain\noffers: [{id: a}]\n", tmp_path / "spec.yaml") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ('{"offer": "a"}', "must hold a list of objects"),
        ("[1, 2", "is not JSON"),
    ],
)
def test_a_file_that_cannot_be_read_names_the_corpus(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "catalog.json").write_text(content)
    with pytest.raises(InvalidArgument, match=message) as refused:
        resolve_corpus_files(SPEC.replace("catalog.csv", "catalog.json"), tmp_path / "spec.yaml")
    assert refused.value.field == "corpora.catalog.file"


@pytest.mark.parametrize(
    ("corpus", "message"),
    [
        (
            {"key": "offer", "rows": [{"offer": "a"}, {"offer": "a"}]},
            "corpora.catalog.rows[1]: key 'a' repeats",
        ),
        (
            {"key": "offer", "rows": [{"sku": "a"}]},
            "corpora.catalog.rows[0]: no value for the key column 'offer'",
        ),
        (
            {"key": "offer", "file": "x.csv"},
            "corpora.catalog.file: 'x.csv' is read by `liveloop config publish`",
        ),
    ],
)
def test_the_service_refuses_corpora_it_cannot_serve_naming_the_field(corpus: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        deployment_spec_from_mapping({"name": "c", "offers": [{"id": "a"}], "corpora": {"catalog": corpus}})


def test_a_corpus_table_is_read_through_the_reader_the_cli_gives(tmp_path: Path) -> None:
    spec = "name: t\noffers: [{id: a}]\ncorpora:\n  plans: {key: plan, table: plans}\n"
    asked: list[str] = []

    def read_table(table: str) -> tuple[list[dict[str, object]], str]:
        asked.append(table)
        return [{"plan": "p1", "fee": 5}], f"table {table} fingerprint:abc"

    resolved = resolve_corpus_files(spec, tmp_path / "spec.yaml", read_table)
    assert resolved is not None
    assert asked == ["plans"]
    assert json.loads(resolved)["corpora"]["plans"] == {
        "key": "plan",
        "rows": [{"plan": "p1", "fee": 5}],
        "source": "table plans fingerprint:abc",
    }
    with pytest.raises(InvalidArgument, match="no ingest service") as refused:
        resolve_corpus_files(spec, tmp_path / "spec.yaml")
    assert refused.value.field == "corpora.plans.table"


def test_a_csv_keeps_what_is_not_plainly_a_number_as_text(tmp_path: Path) -> None:
    """Review findings: ids with leading zeros or underscores stay text, the key column is never
    converted, nan and inf are text, a spreadsheet's byte order mark and quoted newlines survive."""
    (tmp_path / "catalog.csv").write_bytes(
        '\ufeffoffer,margin,code,note\n007,1.5,1_000,"two\nlines"\n7,2,nan,inf\n10,-0.5,0,\n'.encode()
    )
    resolved = resolve_corpus_files(SPEC, tmp_path / "spec.yaml")
    assert resolved is not None
    rows = json.loads(resolved)["corpora"]["catalog"]["rows"]
    assert rows == [
        {"offer": "007", "margin": 1.5, "code": "1_000", "note": "two\nlines"},
        {"offer": "7", "margin": 2, "code": "nan", "note": "inf"},
        {"offer": "10", "margin": -0.5, "code": 0, "note": None},
    ]


def test_dates_elsewhere_in_the_spec_and_a_corpus_too_big_for_a_spec(tmp_path: Path) -> None:
    (tmp_path / "catalog.csv").write_text("offer,margin\na,1\n")
    dated = SPEC.replace("rows: [{code: n, name: North}]", "rows: [{code: n, since: 2024-01-01}]")
    resolved = resolve_corpus_files(dated, tmp_path / "spec.yaml")
    assert resolved is not None
    assert json.loads(resolved)["corpora"]["regions"]["rows"] == [{"code": "n", "since": "2024-01-01"}]

    big = "offer,text\n" + "".join(f"o{i},{'x' * 40}\n" for i in range(30_000))
    (tmp_path / "catalog.csv").write_text(big)
    with pytest.raises(InvalidArgument, match="30000 rows make the spec") as refused:
        resolve_corpus_files(SPEC, tmp_path / "spec.yaml")
    assert refused.value.field == "corpora.catalog"


def test_monitor_evaluate_reads_a_candidates_corpus_files_too(tmp_path: Path) -> None:
    from libs.cli.monitor_commands import candidate_spec_json

    (tmp_path / "catalog.csv").write_text("offer,margin\na,1\n")
    (tmp_path / "spec.yaml").write_text(SPEC)
    document = json.loads(candidate_spec_json(tmp_path / "spec.yaml"))
    assert document["corpora"]["catalog"]["rows"] == [{"offer": "a", "margin": 1}]
