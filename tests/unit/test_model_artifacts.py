"""The artifact format shared by the trainer and the predictor: one verified reader, refusing any
artifact whose files are missing, changed or not the version asked for, and the one mapping of raw
values to category labels. Artifacts here are hand-made (the reader never loads the model), plus one
sealed the way the trainer's registry seals them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from libs.common.errors import FailedPrecondition
from libs.common.model_artifacts import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MODEL_FILE,
    PREPROCESSING_FILE,
    REFERENCE_FILE,
    category_label,
    read_verified,
)

pytestmark = pytest.mark.timeout(30)

CONTENTS = {
    MODEL_FILE: b"not really TorchScript: the reader never loads it",
    PREPROCESSING_FILE: b'{"format": "liveloop.preprocessing/1"}',
    REFERENCE_FILE: b'{"rows": [], "predictions": []}',
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(contents: dict[str, bytes] = CONTENTS) -> dict[str, str]:
    return {file: sha256(data) for file, data in contents.items()}


def write_manifest(directory: Path, files: dict[str, str], **identity: Any) -> str:
    document = {"format": MANIFEST_FORMAT, "model": "take-up", "version": 1, "files": files, **identity}
    data = json.dumps(document).encode()
    (directory / MANIFEST_FILE).write_bytes(data)
    return sha256(data)


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    directory = tmp_path / "take-up" / "1"
    directory.mkdir(parents=True)
    for file, data in CONTENTS.items():
        (directory / file).write_bytes(data)
    write_manifest(directory, digests())
    return directory


def refusal(directory: Path, name: str = "take-up", version: int = 1, **options: Any) -> FailedPrecondition:
    with pytest.raises(FailedPrecondition) as raised:
        read_verified(directory, name, version, **options)
    return raised.value


def test_a_good_artifact_reads_back_with_its_bytes_and_the_manifests_checksum(artifact: Path) -> None:
    verified = read_verified(artifact, "take-up", 1)
    assert dict(verified.files) == CONTENTS
    assert verified.checksum == sha256((artifact / MANIFEST_FILE).read_bytes())
    assert (verified.name, verified.version, verified.where) == ("take-up", 1, "model 'take-up' version 1")
    assert read_verified(artifact, "take-up", 1, registered_checksum=verified.checksum) == verified


def test_a_changed_file_is_refused_naming_the_file_and_the_field(artifact: Path) -> None:
    (artifact / MODEL_FILE).write_bytes(CONTENTS[MODEL_FILE] + b"\0")
    error = refusal(artifact, field="version_b")
    assert error.field == "version_b"
    assert "checksum mismatch for model.pt" in error.message
    assert "the artifact is corrupt or was changed after training" in error.message


def test_a_listed_file_that_is_missing_is_refused(artifact: Path) -> None:
    (artifact / REFERENCE_FILE).unlink()
    error = refusal(artifact)
    assert error.field == "model"
    assert "cannot read reference.json" in error.message


def test_a_manifest_that_omits_a_required_file_is_refused(artifact: Path) -> None:
    write_manifest(artifact, {f: d for f, d in digests().items() if f != REFERENCE_FILE})
    assert "the manifest lists no reference.json" in refusal(artifact).message


def test_extra_files_are_verified_when_listed_and_ignored_when_not(artifact: Path) -> None:
    (artifact / "notes.txt").write_bytes(b"listed")
    (artifact / "stray.bin").write_bytes(b"not listed")
    write_manifest(artifact, digests({**CONTENTS, "notes.txt": b"listed"}))
    assert set(read_verified(artifact, "take-up", 1).files) == {*CONTENTS, "notes.txt"}
    (artifact / "notes.txt").write_bytes(b"changed")
    assert "checksum mismatch for notes.txt" in refusal(artifact).message


def test_a_manifest_for_another_name_version_or_format_is_refused(artifact: Path) -> None:
    assert "describes 'take-up' version 1" in refusal(artifact, version=2).message
    assert "describes 'take-up' version 1" in refusal(artifact, name="churn").message
    write_manifest(artifact, digests(), format="other/1")
    assert "describes 'take-up' version 1" in refusal(artifact).message


def test_a_missing_or_unreadable_manifest_is_refused(artifact: Path) -> None:
    (artifact / MANIFEST_FILE).write_text("{not json")
    assert "unreadable manifest" in refusal(artifact).message
    (artifact / MANIFEST_FILE).write_text('{"format": "liveloop.artifact/1"}')
    assert "unreadable manifest" in refusal(artifact).message
    (artifact / MANIFEST_FILE).unlink()
    assert f"cannot read {artifact / MANIFEST_FILE}" in refusal(artifact).message


def test_a_manifest_rewritten_after_registration_is_refused_though_the_files_agree_with_it(
    artifact: Path,
) -> None:
    registered = sha256((artifact / MANIFEST_FILE).read_bytes())
    (artifact / MODEL_FILE).write_bytes(b"retrained")
    write_manifest(artifact, digests({**CONTENTS, MODEL_FILE: b"retrained"}))
    assert read_verified(artifact, "take-up", 1).files[MODEL_FILE] == b"retrained"
    error = refusal(artifact, registered_checksum=registered, field="version_a")
    assert error.field == "version_a"
    assert "is not the registered one" in error.message


def test_an_artifact_sealed_by_the_trainers_registry_reads_back(tmp_path: Path) -> None:
    from services.trainer.core.store import seal_artifact

    staging = tmp_path / "staging"
    staging.mkdir()
    for file, data in CONTENTS.items():
        (staging / file).write_bytes(data)
    checksum = seal_artifact(staging, tmp_path / "take-up" / "3", "take-up", 3)
    verified = read_verified(tmp_path / "take-up" / "3", "take-up", 3, registered_checksum=checksum)
    assert dict(verified.files) == CONTENTS


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (None, None),
        (float("nan"), None),
        (True, "true"),
        (False, "false"),
        (3.0, "3"),
        (3, "3"),
        (2.5, "2.5"),
        ("north", "north"),
        ("3.0", "3.0"),  # strings are labels as given
    ],
)
def test_category_label(value: Any, label: str | None) -> None:
    assert category_label(value) == label


def test_a_training_set_feature_is_served_from_the_online_feature_of_the_same_name() -> None:
    """BuildTrainingSet names columns <view>__<feature>; the online store keeps <feature>."""
    from libs.common.model_artifacts import PREPROCESSING_FORMAT
    from libs.policy.models import FeatureEncoder

    encoder = FeatureEncoder(
        {
            "format": PREPROCESSING_FORMAT,
            "features": [
                {"name": "customer_profile__age", "encoding": "standardize", "mean": 40.0},
                {"name": "offer", "encoding": "offer", "categories": ["a", "b"]},
            ],
            "inputs": ["customer_profile__age", "offer=a", "offer=b"],
            "offer_feature": "offer",
        }
    )
    assert encoder.encode({"age": "30"}).tolist() == [30.0, 0.0, 0.0]
    assert encoder.encode({}).tolist() == [40.0, 0.0, 0.0]  # missing: the training mean
    assert encoder.encode({"customer_profile__age": 20, "age": 30}).tolist() == [20.0, 0.0, 0.0]
    assert encoder.encode_offers({"age": 25}, ["b"]).tolist() == [[25.0, 0.0, 1.0]]
