"""The manifest's seal is required: an artifact without manifest_sha256 is refused, and sealed again only
by `spexport reseal`, which says what it trusts."""

import json
from pathlib import Path

import pytest
from checks import copy, ends_cleanly, invoke, one_line

from spexport.artifact.manifest import MANIFEST
from spexport.errors import ArtifactError
from spexport.runtime import load


def _unsealed(tiny_llama, folder: Path, edit=lambda manifest: None) -> Path:
    """The tiny artifact with its manifest's seal removed, as spexport wrote manifests before the seal."""
    folder = copy(tiny_llama["artifact"], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["manifest_sha256"]
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def test_an_unsealed_manifest_is_refused(tiny_llama, tmp_path):
    """Before: deleting the field let any edit of the manifest through."""
    folder = _unsealed(tiny_llama, tmp_path / "artifact", lambda m: m["tasks"][0].update(name="renamed"))
    for verify in (True, False):
        with pytest.raises(ArtifactError, match=r"spexport.json has no manifest_sha256, so edits to it cannot be "
                                                r"detected; .*spexport reseal") as raised:
            load(folder, verify=verify)
        one_line(str(raised.value))
    result = invoke("inspect", folder)
    assert result.exit_code == ArtifactError.exit_code
    ends_cleanly(result, r"no manifest_sha256")


def test_reseal_says_what_it_trusts_and_then_the_artifact_loads(tiny_llama, tmp_path):
    folder = _unsealed(tiny_llama, tmp_path / "artifact")
    result = invoke("reseal", folder)
    assert result.exit_code == 0, result.output
    files = len(json.loads((folder / MANIFEST).read_text())["files"])
    assert f"trusting spexport.json as it stands: 2 tasks (pt, prefix), {files} files, each checked against its " \
           "sha256" in result.output, result.output
    assert load(folder).tasks == ["pt", "prefix"]
    again = invoke("reseal", folder)
    assert again.exit_code == 0 and "already sealed; nothing to do" in again.output


def test_reseal_refuses_a_damaged_file_or_a_broken_seal(tiny_llama, tmp_path):
    folder = _unsealed(tiny_llama, tmp_path / "damaged")
    (folder / "tokenizer.json").write_text("{}")
    result = invoke("reseal", folder)
    assert result.exit_code == ArtifactError.exit_code
    ends_cleanly(result, r"tokenizer.json is damaged or was replaced; reseal trusts the manifest only when")
    assert "manifest_sha256" not in (folder / MANIFEST).read_text()
    tampered = copy(tiny_llama["artifact"], tmp_path / "tampered")
    text = (tampered / MANIFEST).read_text()
    (tampered / MANIFEST).write_text(text.replace('"name": "pt"', '"name": "qt"'))
    result = invoke("reseal", tampered)
    assert result.exit_code == ArtifactError.exit_code
    ends_cleanly(result, r"does not match the manifest_sha256 it records")
    assert (tampered / MANIFEST).read_text() == text.replace('"name": "pt"', '"name": "qt"')
