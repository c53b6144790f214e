"""Derivation rules: configs as untrusted data, unknown ops pin, the self-check refuses."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from findlady_core.derive import read_folder, spec_from_config, spec_from_folder
from findlady_core.derive import graph as G
from findlady_core.derive.build import derive
from findlady_core.errors import SpecError
from findlady_core.spec import Spec


def _bert(**kw) -> dict:
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                  vocab_size=40, max_position_embeddings=16, architectures=["BertForSequenceClassification"], **kw)
    return json.loads(cfg.to_json_string())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "no-such-family"}, "model_type"),
        ({"architectures": ["GPT2LMHeadModel"]}, "belongs to 'gpt2'"),
        ({"architectures": ["os.system"]}, "not a model class"),
        ({"architectures": ["BertConfig"]}, "not a model class"),
        ({"num_hidden_layers": 100000}, "num_hidden_layers"),
        ({"hidden_size": 1 << 40}, "out of range"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
        ({"hidden_size": 15}, "cannot be built"),  # 15 is not a multiple of 2 heads
    ],
)
def test_bad_configs_are_refused_with_the_reason(change, match):
    cfg = _bert()
    cfg.update(change)
    with pytest.raises(SpecError, match=match):
        spec_from_config(cfg, self_check=False)


def test_auto_map_is_ignored_and_said():
    cfg = _bert()
    cfg["auto_map"] = {"AutoModel": "evil.Model"}
    spec = spec_from_config(cfg, self_check=False)
    assert any("auto_map ignored" in w for w in spec.warnings)


def test_without_architectures_the_base_model_is_built():
    cfg = _bert()
    del cfg["architectures"]
    assert spec_from_config(cfg, self_check=False).meta["architecture"] == "BertModel"


def test_stored_names_and_shapes_must_match_the_config(tmp_path):
    cfg = transformers.BertConfig(**{k: v for k, v in _bert().items() if k not in ("model_type", "transformers_version")})
    model = transformers.BertForSequenceClassification(cfg)
    model.save_pretrained(tmp_path)
    config, stored = read_folder(tmp_path)
    assert "bert.embeddings.word_embeddings.weight" in stored
    spec = spec_from_folder(tmp_path, self_check=False)
    assert spec.tensors <= set(stored)
    config["intermediate_size"] = 24  # the files hold 20
    with pytest.raises(SpecError, match="config implies"):
        spec_from_config(config, stored, self_check=False)
    # a base model's files (no 'bert.' prefix) fit the task class's names too
    base = {k[len("bert."):]: v for k, v in stored.items() if k.startswith("bert.")}
    config["intermediate_size"] = 20
    config["architectures"] = ["BertModel"]
    assert spec_from_config(config, base, self_check=False).tensors <= set(base)


class _Net(nn.Module):
    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)
        self.mix = mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = self.fc2(h)
        if self.mix:
            h = torch.cumsum(h, dim=-1)  # mixes the features in order: no permutation survives it
        return self.fc3(torch.tanh(h))


@pytest.mark.parametrize("mix", [False, True])
def test_an_op_without_rule_pins_what_it_touches(mix):
    net = _Net(mix)
    names = {k: [k] for k in net.state_dict()}
    d = derive(net, {"x": torch.randn(2, 5)}, names, pin_outputs=True)
    sizes = sorted(g.size for g in d.groups)
    if mix:
        assert sizes == [7]  # fc2's outputs feed cumsum: pinned
        assert any("aten::cumsum" in w for w in d.warnings)
        assert any("fc2.weight axis 0" in w for w in d.warnings)
    else:
        assert sizes == [6, 7] and not d.warnings


def test_a_wrong_rule_is_caught_by_the_self_check(monkeypatch):
    """A layer norm rule that forgot its scale and shift leaves them out of the residual group
    (and makes them groups of their own): the self-check permutes the groups, sees the logits
    change and refuses, naming the first group that breaks them."""
    good = G.RULES["aten::layer_norm"]

    def forgetful(w, node):
        return w.lay(node.args[0])

    monkeypatch.setitem(G.RULES, "aten::layer_norm", forgetful)
    with pytest.raises(SpecError, match=r"self-check failed: permuting group 'bert\.embeddings\.word_embeddings' changes the outputs"):
        spec_from_config(_bert())
    monkeypatch.setitem(G.RULES, "aten::layer_norm", good)
    assert spec_from_config(_bert()).meta["self_check"]["relative_error"] < 1e-9


def _spec(extra: dict) -> dict:
    return {"format": "findlady.spec/1", "groups": [{"name": "g", "size": 2, "members": [{"tensor": "w", "axis": 0}]}], **extra}


def test_spec_source_and_warnings_are_validated_data():
    s = Spec.from_dict(_spec({"source": "config", "warnings": ["pinned, why: ..."]}))
    assert s.source == "config" and s.warnings == ("pinned, why: ...",)
    assert json.loads(s.to_json())["source"] == "config"
    with pytest.raises(SpecError, match="source"):
        Spec.from_dict(_spec({"source": "guess"}))
    with pytest.raises(SpecError, match="warnings"):
        Spec.from_dict(_spec({"warnings": "not a list"}))


def test_one_axis_twice_in_a_group_only_with_disjoint_ranges():
    members = [{"tensor": "w", "axis": 0, "offset": 0}, {"tensor": "w", "axis": 0, "offset": 2}]
    spec = Spec.from_dict({"format": "findlady.spec/1", "groups": [{"name": "g", "size": 2, "members": members}]})
    spec.validate({"w": torch.zeros(4, 3)})
    members[1]["offset"] = 1
    with pytest.raises(SpecError, match="overlapping"):
        Spec.from_dict({"format": "findlady.spec/1", "groups": [{"name": "g", "size": 2, "members": members}]})
