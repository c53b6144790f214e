"""Regression: the solver at BERT-large shape (hidden 1024, 16 heads of 64).

There each heads group has 4 x 1024 aligned values per head once the residual is solved, which
counts as strong evidence, yet every one of its members is only partly aligned (the dims inside
the heads are not solved yet), so all were skipped and the solve ended in an AssertionError.
"""

from __future__ import annotations

import torch
import transformers

from findlady_core.catalog import bert_spec
from findlady_core.permute import apply_permutations, psi_composed, random_permutations
from findlady_core.resync import resync


def test_resync_bert_large_shape_recovers_every_neuron() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=1024, num_attention_heads=16, num_hidden_layers=2,
                                  intermediate_size=1024, max_position_embeddings=32)
    ref = {k: v for k, v in transformers.BertModel(cfg).state_dict().items() if v.is_floating_point()}
    spec = bert_spec(ref, num_heads=16)
    attack = random_permutations(spec, seed=1)
    sus = apply_permutations(ref, spec, attack)
    gen = torch.Generator().manual_seed(2)
    sus = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=gen) if v.dim() >= 2 else v for k, v in sus.items()}
    result = resync(ref, sus, spec, device="cpu")
    shapes = {k: v.shape for k, v in ref.items()}
    assert psi_composed(spec, attack, result.permutations, shapes) == 100.0
