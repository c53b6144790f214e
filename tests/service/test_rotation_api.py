"""A reference registered as a folder with its config.json: the job undoes a suspect's
residual-stream rotation (issue 15) before re-synchronizing, and other-seed models stay no_match."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from findlady_core.choose import spec_for
from findlady_core.folders import load_folder, save_folder
from findlady_core.permute import apply_permutations, random_permutations
from findlady_core.rotation import family_from_config, rotate_residual

from .helpers import auth

pytestmark = pytest.mark.slow


def _llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _rotated_copy(src: Path, out: Path, seed: int) -> None:
    """Every group permuted, then the residual stream rotated (norms folded): the same function."""
    folder = load_folder(src)
    spec = spec_for(folder.state_dict, folder.config)
    sd = apply_permutations(folder.state_dict, spec, random_permutations(spec, seed=seed))
    sd, _ = rotate_residual(sd, family_from_config(folder.config, sd.keys()), seed=seed)
    save_folder(sd, out, folder)


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"m/{f.name}")
    return buf.getvalue()


def _verdict(api: Any, key: str, ref_id: str, folder: Path) -> dict[str, Any]:
    r = api.http.post("/v1/verifications", headers=auth(key), data={"reference_id": ref_id},
                      files=[("archive", ("m.zip", _zip(folder)))])
    assert r.status_code == 202, r.text
    done = api.wait(key, r.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    return dict(done["report"])


def test_a_rotated_copy_is_recognised_and_an_other_seed_model_is_not(embedded, tmp_path: Path) -> None:
    _, api = embedded
    owner = api.account("owner")
    _llama(0).save_pretrained(tmp_path / "ref")
    _rotated_copy(tmp_path / "ref", tmp_path / "copy", seed=5)
    _llama(1).save_pretrained(tmp_path / "other-plain")
    _rotated_copy(tmp_path / "other-plain", tmp_path / "other", seed=6)

    r = api.http.post("/v1/references", headers=auth(owner), data={"name": "tiny-llama"},
                      files=[("archive", ("ref.zip", _zip(tmp_path / "ref")))])
    assert r.status_code == 201, r.text
    ref = r.json()
    assert ref["spec"]["source"] == "config"

    copy = _verdict(api, owner, ref["id"], tmp_path / "copy")
    assert copy["verdict"] == "match", copy["reasons"]
    kinds = [t["kind"] for t in copy["resync"]["transforms"]]
    assert "rotation" in kinds
    other = _verdict(api, owner, ref["id"], tmp_path / "other")
    assert other["verdict"] == "no_match", other["reasons"]
    assert "rotation" not in [t["kind"] for t in other["resync"]["transforms"]]
