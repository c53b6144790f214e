"""Model folders over REST: a sharded BERT (written by ``save_pretrained``) registered as
``weights`` x N + ``index`` + ``config``, a permuted copy submitted as a zip (and a tar) of its
folder, and hostile archives refused with 422 naming the member, leaving nothing behind."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers

from findlady_core.choose import spec_for
from findlady_core.folders import load_folder, save_folder
from findlady_core.io import save_state_dict
from findlady_core.permute import apply_permutations, random_permutations

from .helpers import auth, counts, settled_counts

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bert_folders")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(d / "ref", max_shard_size="30KB")
    ref = load_folder(d / "ref")
    assert len(ref.layout.shards) >= 3
    spec = spec_for(ref.state_dict, ref.config)
    save_folder(apply_permutations(ref.state_dict, spec, random_permutations(spec, seed=4)), d / "sus", ref)
    other = transformers.BertForSequenceClassification(cfg)  # another random init: the unrelated model
    other.save_pretrained(d / "other", max_shard_size="30KB")
    with zipfile.ZipFile(d / "sus.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted((d / "sus").iterdir()):
            z.write(f, f"sus/{f.name}")
        z.writestr("sus/README.md", "not a model file: skipped")
    with tarfile.open(d / "other.tar", "w") as t:
        t.add(d / "other", arcname="other")
    return {"ref": d / "ref", "sus": d / "sus", "other": d / "other", "zip": d / "sus.zip", "tar": d / "other.tar",
            "dir": d}


def _folder_parts(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    parts = [("weights", (f.name, f.read_bytes())) for f in sorted(folder.glob("*.safetensors"))]
    parts.append(("index", (INDEX, (folder / INDEX).read_bytes())))
    parts.append(("config", ("config.json", (folder / "config.json").read_bytes())))
    return parts


def _post(api: Any, key: str, path: str, data: dict[str, str], parts: list[Any]) -> httpx.Response:
    return api.http.post(path, headers=auth(key), data=data, files=parts)


def _wait_verdict(api: Any, key: str, r: httpx.Response) -> str:
    assert r.status_code == 202, r.text
    done = api.wait(key, r.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    return str(done["report"]["verdict"])


def test_sharded_bert_registered_in_parts_and_verified_from_archives(embedded, bert: dict[str, Path]) -> None:
    app, api = embedded
    owner = api.account("owner")
    r = _post(api, owner, "/v1/references", {"name": "bert-sharded"}, _folder_parts(bert["ref"]))
    assert r.status_code == 201, r.text
    ref = r.json()
    assert ref["spec"]["source"] == "config"  # derived from the architecture config.json names

    def sizes(tensor: str) -> list[int]:
        return sorted(g["size"] for g in ref["spec"]["groups"]
                      if any(m["tensor"] == tensor and m["axis"] == 0 for m in g["members"]))

    assert sizes("bert.pooler.dense.weight") == [32]  # the pooler's hidden neurons
    # config.json's 4 heads, then the 8 q/k dims inside each of them
    assert sizes("bert.encoder.layer.1.attention.self.query.weight") == [4, 8, 8, 8, 8]
    store = app.state.runtime.blobs
    assert store.path(ref["sha256"]).is_dir()  # one folder blob holding the shards, the index and the config
    stored = sorted(p.name for p in store.path(ref["sha256"]).iterdir())
    assert stored == sorted(p.name for p in bert["ref"].iterdir())
    from app.models import Reference

    with app.state.runtime.sessions() as s:
        assert s.get(Reference, ref["id"]).config["num_attention_heads"] == 4

    # The permuted copy as a zip of its folder: the same model, re-synchronized.
    with bert["zip"].open("rb") as fh:
        r = _post(api, owner, "/v1/verifications", {"reference_id": ref["id"]}, [("archive", ("sus.zip", fh))])
    assert _wait_verdict(api, owner, r) == "match"
    # An unrelated model of the same architecture, as a tar of its folder.
    with bert["tar"].open("rb") as fh:
        r = _post(api, owner, "/v1/verifications", {"reference_id": ref["id"]}, [("archive", ("other.tar", fh))])
    assert _wait_verdict(api, owner, r) == "no_match"


def _zip(members: dict[str, bytes], *, symlinks: tuple[str, ...] = (), compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compress
            if name in symlinks:
                info.external_attr = (0o120777 << 16)
            z.writestr(info, data)
    return buf.getvalue()


def _tar(add: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        add(t)
    return buf.getvalue()


def _tar_member(t: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def hostile_archives(bert: dict[str, Path]) -> dict[str, tuple[bytes, str]]:
    """name -> (archive bytes, text the refusal must contain: the member or the reason)."""
    ok = {f"m/{f.name}": f.read_bytes() for f in sorted(bert["sus"].iterdir())}
    st = next(iter(v for k, v in ok.items() if k.endswith(".safetensors")))
    many = {f"m/f{i}.txt": b"x" for i in range(300)}
    return {
        "zip_traversal": (_zip({**ok, "m/../../evil.safetensors": st}), "evil.safetensors"),
        "zip_absolute": (_zip({"/etc/model.safetensors": st}), "/etc/model.safetensors"),
        "zip_symlink": (_zip({**ok, "m/link.safetensors": b"/etc/passwd"}, symlinks=("m/link.safetensors",)),
                        "m/link.safetensors"),
        "zip_bomb": (_zip({"m/config.json": b"{}", "m/model.safetensors": b"\0" * (64 << 20)},
                          compress=zipfile.ZIP_DEFLATED), "m/model.safetensors"),
        "zip_too_many": (_zip({**ok, **many}), "more than 256"),
        "zip_two_folders": (_zip({"a/config.json": b"{}", "b/model.safetensors": st}), "one top-level folder"),
        "zip_nested": (_zip({"a/b/model.safetensors": st}), "a/b/model.safetensors"),
        "tar_symlink": (_tar(lambda t: _tar_member(t, "m/model.safetensors", kind=tarfile.SYMTYPE, link="/etc/passwd")),
                        "m/model.safetensors"),
        "tar_hardlink": (_tar(lambda t: _tar_member(t, "m/model.safetensors", kind=tarfile.LNKTYPE, link="/etc/passwd")),
                         "m/model.safetensors"),
        "tar_device": (_tar(lambda t: _tar_member(t, "m/config.json", kind=tarfile.CHRTYPE)), "m/config.json"),
        "tar_traversal": (_tar(lambda t: _tar_member(t, "../model.safetensors", st)), "../model.safetensors"),
        "not_an_archive": (b"hello" * 200, "neither a zip nor a tar"),
    }


@pytest.mark.parametrize("case", ["zip_traversal", "zip_absolute", "zip_symlink", "zip_bomb", "zip_too_many",
                                  "zip_two_folders", "zip_nested", "tar_symlink", "tar_hardlink", "tar_device",
                                  "tar_traversal", "not_an_archive"])
def test_hostile_archives_are_refused_and_leave_nothing(embedded, bert: dict[str, Path],
                                                        hostile_archives: dict[str, tuple[bytes, str]], case: str) -> None:
    app, api = embedded
    owner = api.account("owner")
    data, says = hostile_archives[case]
    before = settled_counts(app)
    for path, fields in (("/v1/references", {"name": "hostile"}), ("/v1/verifications", {"reference_id": "x"})):
        if path == "/v1/verifications":
            r0 = _post(api, owner, "/v1/references", {"name": "target"}, _folder_parts(bert["ref"]))
            assert r0.status_code == 201, r0.text
            fields = {"reference_id": r0.json()["id"]}
            before = settled_counts(app)
        r = _post(api, owner, path, fields, [("archive", ("model.zip", data))])
        assert r.status_code == 422, (case, r.text)
        detail = r.json()["detail"]
        assert detail["code"] == "bad_archive" and says in detail["message"], (case, detail)
        assert counts(app) == before, case  # no row, no blob, no staging folder, no temporary file
    assert not (bert["dir"].parent / "evil.safetensors").exists()


def test_folder_parts_that_do_not_fit_are_refused(embedded, bert: dict[str, Path], tmp_path: Path) -> None:
    app, api = embedded
    owner = api.account("owner")
    parts = _folder_parts(bert["ref"])
    before = settled_counts(app)
    cases = {
        "several shards without the index": ([p for p in parts if p[0] == "weights"], "need the 'index' part"),
        "a shard missing": ([p for i, p in enumerate(parts) if i != 0], "is missing"),
        "a shard twice": ([parts[0], *parts], "sent twice"),
        "both forms": ([*parts, ("archive", ("x.zip", bert["zip"].read_bytes()))], "not both"),
        "a shard under another name": ([("weights", ("other.safetensors", parts[0][1][1])), *parts[1:]], "is missing"),
    }
    for label, (form, says) in cases.items():
        r = _post(api, owner, "/v1/references", {"name": "bad-folder"}, form)
        assert r.status_code == 422 and says in r.json()["detail"]["message"], (label, r.text)
        assert counts(app) == before, label


def test_bare_files_get_honest_specs_over_rest(embedded, bert: dict[str, Path], tmp_path: Path) -> None:
    app, api = embedded
    owner = api.account("owner")
    # GPT-2: not a known family, not a plain chain: 422 saying what to give.
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=64))
    save_state_dict(dict(gpt2.state_dict()), tmp_path / "gpt2.safetensors")
    before = settled_counts(app)
    r = api.register(owner, "gpt2", weights=tmp_path / "gpt2.safetensors")
    assert r.status_code == 422 and r.json()["detail"]["code"] == "unknown_family", r.text
    assert "known families: bert" in r.json()["detail"]["message"] and "config.json" in r.json()["detail"]["message"]
    assert counts(app) == before
    # The bare BERT file: the catalog without heads; with num_heads, with them.
    bare = tmp_path / "bert.safetensors"
    save_state_dict(load_folder(bert["ref"]).state_dict, bare)
    plain = api.register(owner, "bert-bare", weights=bare).json()
    assert not any(g["name"].endswith("attention.heads") for g in plain["spec"]["groups"])
    told = api.register(owner, "bert-bare", {"num_heads": "4"}, weights=bare).json()
    assert any(g["name"].endswith("attention.heads") and g["size"] == 4 for g in told["spec"]["groups"])
    r = api.register(owner, "bert-bare", {"num_heads": "lots"}, weights=bare)
    assert r.status_code == 422 and "num_heads" in r.text
