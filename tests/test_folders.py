"""Model folders as owners have them (written by transformers' own ``save_pretrained``), through
the core and the CLI: loading the union of the shards, specs that keep the logits, attack and
resync folder to folder, and honest refusals for bare files of unknown families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from findlady_cli.main import main
from findlady_core.errors import WeightsError
from findlady_core.folders import load_folder
from findlady_core.io import file_sha256, load_state_dict, save_state_dict
from findlady_core.permute import apply_permutations, random_permutations
from findlady_core.spec import Spec

VOCAB = 100


def _bert_config(**kw: object) -> transformers.BertConfig:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3, **kw)
    cfg._attn_implementation = "eager"
    return cfg


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-head BertForSequenceClassification (random init) saved whole, in 3+ shards, in bf16,
    and as a bare file."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config()).eval()
    model.save_pretrained(root / "one")
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    model.to(torch.bfloat16).save_pretrained(root / "bf16", max_shard_size="30KB")
    shutil.copyfile(root / "one" / "model.safetensors", root / "bare.safetensors")
    return {"one": root / "one", "sharded": root / "sharded", "bf16": root / "bf16", "bare": root / "bare.safetensors"}


def run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _logits(folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """float64 logits of the folder's model (or of ``state_dict`` loaded into it)."""
    model = transformers.BertForSequenceClassification(_bert_config()).double().eval()
    sd = state_dict if state_dict is not None else load_state_dict(folder)
    missing, unexpected = model.load_state_dict({k: v.double() for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"bert.embeddings.position_ids"}
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_sharded_folder_is_the_union_of_its_shards(bert_dirs: dict[str, Path]) -> None:
    sharded = load_folder(bert_dirs["sharded"])
    assert len(sharded.layout.shards) >= 3
    one = load_state_dict(bert_dirs["one"])
    assert set(sharded.state_dict) == set(one)
    assert all(torch.equal(sharded.state_dict[k], one[k]) for k in one)
    assert sharded.config is not None and sharded.config["num_attention_heads"] == 4
    # The folder hash covers its model files only, and changes with any byte of a shard.
    h = file_sha256(bert_dirs["sharded"])
    assert h == file_sha256(bert_dirs["sharded"]) and h != file_sha256(bert_dirs["one"])


def _broken_copy(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    edit(doc, dst)
    index.write_text(json.dumps(doc))
    return dst


def test_index_must_match_the_shards_exactly(bert_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = bert_dirs["sharded"]
    name = "classifier.weight"

    def drop(doc, d):  # type: ignore[no-untyped-def]
        del doc["weight_map"][name]

    def move(doc, d):  # type: ignore[no-untyped-def]
        shards = sorted(set(doc["weight_map"].values()))
        doc["weight_map"][name] = next(s for s in shards if s != doc["weight_map"][name])

    def ghost(doc, d):  # type: ignore[no-untyped-def]
        doc["weight_map"]["ghost.weight"] = doc["weight_map"][name]

    def lose(doc, d):  # type: ignore[no-untyped-def]
        (d / doc["weight_map"][name]).unlink()

    def escape(doc, d):  # type: ignore[no-untyped-def]
        doc["weight_map"][name] = "../model.safetensors"

    for edit, message in ((drop, "does not list it"), (move, "but the index puts it in"),
                          (ghost, "in no shard"), (lose, "is missing"), (escape, "not a plain file name")):
        bad = _broken_copy(src, tmp_path / edit.__name__, edit)
        with pytest.raises(WeightsError, match=message):
            load_state_dict(bad)


def test_tensor_in_two_shards_is_refused(bert_dirs: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "dup"
    shutil.copytree(bert_dirs["sharded"], d)
    doc = json.loads((d / "model.safetensors.index.json").read_text())
    first, second = sorted(set(doc["weight_map"].values()))[:2]
    extra = {k: v for k, v in load_state_dict(d / second).items()}
    extra[next(k for k, s in doc["weight_map"].items() if s == first)] = torch.zeros(1)
    save_state_dict(extra, d / second)
    with pytest.raises(WeightsError, match="is in both"):
        load_state_dict(d)


def _groups_with(spec: Spec, tensor: str, axis: int) -> list:
    return [g for g in spec.groups if any(m.tensor == tensor and m.axis == axis for m in g.members)]


@pytest.mark.parametrize("which", ["one", "sharded"])
def test_spec_infer_on_a_folder_keeps_the_logits(which: str, bert_dirs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spec.json"
    code, stdout, err = run(["spec", "infer", "--weights", bert_dirs[which], "-o", out], capsys)
    assert code == 0, err
    spec = Spec.load(out)
    assert spec.source == "config"  # derived from the architecture config.json names
    pooler = _groups_with(spec, "bert.pooler.dense.weight", 0)
    assert [g.size for g in pooler] == [32]  # the pooler's hidden neurons, read by the classifier
    query = _groups_with(spec, "bert.encoder.layer.0.attention.self.query.weight", 0)
    assert sorted(g.size for g in query) == [4, 8, 8, 8, 8]  # config.json's 4 heads, then 8 q/k dims in each
    sd = load_state_dict(bert_dirs[which])
    base = _logits(bert_dirs[which])
    moved = apply_permutations({k: v.double() for k, v in sd.items()}, spec, random_permutations(spec, seed=7))
    assert rel_err(base, _logits(bert_dirs[which], moved)) <= 1e-9


def test_attack_and_resync_folder_to_folder(bert_dirs: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = bert_dirs["sharded"]
    spec, truth, sus, res = (tmp_path / n for n in ("spec.json", "truth.json", "sus", "res"))
    assert run(["spec", "infer", "--weights", src, "-o", spec], capsys)[0] == 0
    code, _, err = run(["attack", src, "-o", sus, "--spec", spec, "--permute", "all", "--noise", "0.1",
                        "--truth", truth], capsys)
    assert code == 0, err
    code, stdout, err = run(["resync", src, sus, "--spec", spec, "--truth", truth, "-o", res, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["psi"]["model"] == 100.0
    # Both outputs keep the input's layout: the same files, the same tensors in each shard.
    for out in (sus, res):
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
        assert load_folder(out).layout.shards == load_folder(src).layout.shards
    assert json.loads((res / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    ref, shuffled, back = (load_state_dict(p) for p in (src, sus, res))

    def distance(sd: dict[str, torch.Tensor]) -> float:  # relative distance to the reference, all weights
        keys = [k for k in ref if ref[k].dim() >= 2]
        return float(sum((ref[k] - sd[k]).norm() ** 2 for k in keys) ** 0.5 / sum(ref[k].norm() ** 2 for k in keys) ** 0.5)

    assert distance(back) < 0.2 < 1.0 < distance(shuffled)  # only the noise is left, the shuffle is undone
    # An output folder that exists and is not empty is refused before any work.
    code, _, err = run(["resync", src, sus, "--spec", spec, "-o", res], capsys)
    assert code == 2 and "not an empty folder" in err


def test_bf16_folder_keeps_its_dtypes(bert_dirs: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    src, spec, sus = bert_dirs["bf16"], tmp_path / "spec.json", tmp_path / "sus"
    assert run(["spec", "infer", "--weights", src, "-o", spec], capsys)[0] == 0
    assert run(["attack", src, "-o", sus, "--spec", spec, "--permute", "all", "--noise", "0.1"], capsys)[0] == 0
    out = load_folder(sus)
    assert {t.dtype for t in out.state_dict.values() if t.is_floating_point()} == {torch.bfloat16}
    index = json.loads((sus / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]


def test_bare_bert_file_gets_heads_only_when_told(bert_dirs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bare, out = bert_dirs["bare"], tmp_path / "spec.json"
    base = _logits(bert_dirs["one"])
    sd = {k: v.double() for k, v in load_state_dict(bare).items()}
    for extra, has_heads in (([], False), (["--num-heads", 4], True)):
        code, _, err = run(["spec", "infer", "--weights", bare, "-o", out, *extra], capsys)
        assert code == 0, err
        spec = Spec.load(out)
        assert any(n.endswith("attention.heads") for n in spec.names) == has_heads
        moved = apply_permutations(sd, spec, random_permutations(spec, seed=2))
        assert rel_err(base, _logits(bert_dirs["one"], moved)) <= 1e-9
    # The head count cannot contradict the folder's config.
    code, _, err = run(["spec", "infer", "--weights", bert_dirs["one"], "-o", out, "--num-heads", 8], capsys)
    assert code == 2 and "contradicts" in err


def _bare(tmp_path: Path, name: str, model: torch.nn.Module) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_state_dict({k: v for k, v in model.state_dict().items()}, path)
    return path


def test_bare_files_of_unknown_families_exit_2_with_what_to_give(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    models = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                                     n_positions=64)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, **small)),
        "vit": transformers.ViTForImageClassification(transformers.ViTConfig(hidden_size=32, image_size=16,
                                                                             patch_size=4, num_labels=3, **small)),
        "roberta": transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, max_position_embeddings=70, **small)),
    }
    for name, model in models.items():
        path = _bare(tmp_path, name, model)
        code, _, err = run(["spec", "infer", "--weights", path, "-o", tmp_path / f"{name}.json"], capsys)
        assert code == 2, (name, err)
        assert "this family is not known" in err and "known families: bert" in err, (name, err)
        assert "config.json" in err and "spec" in err
        assert not (tmp_path / f"{name}.json").exists()
    # RoBERTa's folder (with config.json) gets the spec derived from its architecture instead,
    # and that spec keeps the logits when every group is permuted.
    roberta = models["roberta"].double().eval()
    roberta.save_pretrained(tmp_path / "roberta")
    code, _, err = run(["spec", "infer", "--weights", tmp_path / "roberta", "-o", tmp_path / "r.json"], capsys)
    assert code == 0, err
    spec = Spec.load(tmp_path / "r.json")
    assert spec.source == "config"
    sd = load_state_dict(tmp_path / "roberta")
    moved = apply_permutations(sd, spec, random_permutations(spec, seed=3))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = roberta(input_ids=ids).logits
        roberta.load_state_dict(moved, strict=False)
        after = roberta(input_ids=ids).logits
    assert rel_err(base, after) <= 1e-9


def test_module_tracing_with_token_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tokmod.py").write_text(
        "from torch import nn\n"
        "class TokenMLP(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(50, 16)\n"
        "        self.fc1 = nn.Linear(16, 24)\n"
        "        self.fc2 = nn.Linear(24, 3)\n"
        "    def forward(self, ids):\n"
        "        return self.fc2(self.fc1(self.emb(ids)).relu())\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(["spec", "infer", "--module", "tokmod:TokenMLP", "--input-ids", "2,16", "-o", "s.json"], capsys)
    assert code == 0, err  # traced and self-checked on integer ids
    spec = Spec.load(tmp_path / "s.json")
    assert {(g.name, g.size) for g in spec.groups} == {("emb", 16), ("fc1", 24)}
    assert ("emb.weight", 1) in {(m.tensor, m.axis) for m in spec.group("emb").members}
    code, _, err = run(["spec", "infer", "--module", "tokmod:TokenMLP", "--input-shape", "2,16", "-o", "t.json"], capsys)
    assert code == 2 and "indices" in err  # floats cannot index an embedding
