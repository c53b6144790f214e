"""Tracing specs from modules (findlady_core.trace) and guessing them from weights (infer).

What matters: residual streams become one group, BN statistics move with their channels,
input/output axes never move, flatten gets block = H*W, unknown ops and shared weights fail
loudly, the self-check catches a wrong spec, and the chain guess warns (and is wrong for
residual nets, which the tests document).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from findlady_core.errors import SpecError, TraceError
from findlady_core.infer import infer_chain_spec, infer_spec
from findlady_core.spec import Group, Spec
from findlady_core.trace import check_spec, trace_spec
from findlady_examples.models import MLP, MnistCNN, ResNetStyle, VGGStyle

def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN parameters and statistics (fresh BN is the identity and hides mistakes)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data, m.bias.data = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def seeded(cls: type[nn.Module], *args: object) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(cls(*args)).eval()


def img(batch: int = 2, c: int = 1, hw: int = 28) -> torch.Tensor:
    return torch.randn(batch, c, hw, hw, generator=torch.Generator().manual_seed(1))


def producers(group: Group, state: dict[str, torch.Tensor]) -> set[str]:
    """Layers whose own outputs (rows of a conv/linear weight) are in the group."""
    return {m.tensor.removesuffix(".weight") for m in group.members if m.axis == 0 and state[m.tensor].dim() >= 2}


def group_of(spec: Spec, tensor: str, axis: int = 0) -> Group:
    hits = [g for g in spec.groups if any(m.tensor == tensor and m.axis == axis for m in g.members)]
    assert len(hits) == 1, f"{tensor} axis {axis} is in {len(hits)} groups"
    return hits[0]


def members(spec: Spec) -> set[tuple[str, int]]:
    return {(m.tensor, m.axis) for g in spec.groups for m in g.members}


# --- residual streams, BatchNorm, boundaries -------------------------------------------------


def test_resnet_residual_stream_is_one_group() -> None:
    model = seeded(ResNetStyle)
    spec = trace_spec(model, img())
    state = model.state_dict()
    # Stem and layer1's block both write into the 16-channel stream; layer2's conv2, its 1x1
    # downsample shortcut and layer3's conv2 all write into the 32-channel stream.
    stream16 = group_of(spec, "conv1.weight")
    assert producers(stream16, state) == {"conv1", "layer1.0.conv2"}
    stream32 = group_of(spec, "layer2.0.conv2.weight")
    assert producers(stream32, state) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2"}
    assert stream32.name == "layer2.0.conv2" and stream16.name == "conv1"
    # Every reader of a stream takes it as input: the next blocks' conv1s and the classifier.
    assert {("layer1.0.conv1.weight", 1), ("layer2.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)} <= {
        (m.tensor, m.axis) for m in stream16.members
    }
    assert ("fc.weight", 1) in {(m.tensor, m.axis) for m in stream32.members}
    # The inner neurons of each block are groups of their own: 2 streams + 3 inner = 5 groups.
    assert len(spec.groups) == 5
    assert spec.names == ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1"]


def test_batchnorm_parameters_and_running_stats_are_members() -> None:
    model = seeded(ResNetStyle)
    spec = trace_spec(model, img())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            conv = name.replace("bn", "conv") if "bn" in name else name[:-1] + "0"
            g = group_of(spec, f"{conv}.weight")
            for t in ("weight", "bias", "running_mean", "running_var"):
                assert f"{name}.{t}" in {m.tensor for m in g.members}, (name, t)
    assert not any(t.endswith("num_batches_tracked") for t in spec.tensors)
    # They matter: leave out the running variances and the spec no longer preserves outputs.
    cut = Spec(tuple(Group(g.name, g.size, tuple(m for m in g.members if "running_var" not in m.tensor)) for g in spec.groups))
    with pytest.raises(TraceError, match="not function-preserving"):
        check_spec(model, cut, img())


@pytest.mark.parametrize(
    "cls, x, first, last",
    [
        (MLP, torch.randn(2, 64), "layers.0", "layers.4"),
        (VGGStyle, img(), "features.0", "classifier.2"),
        (ResNetStyle, img(), "conv1", "fc"),
    ],
)
def test_input_and_output_axes_are_never_groups(cls: type[nn.Module], x: torch.Tensor, first: str, last: str) -> None:
    spec = trace_spec(seeded(cls), x)
    got = members(spec)
    assert (f"{first}.weight", 1) not in got
    assert (f"{last}.weight", 0) not in got and (f"{last}.bias", 0) not in got
    assert (f"{last}.weight", 1) in got  # ...while its inputs are permuted


class InputResidual(nn.Module):
    """x + fc2(relu(fc1(x))): fc2 writes into the input's own axis, so it cannot be permuted."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def test_a_stream_tied_to_the_input_is_not_a_group() -> None:
    spec = trace_spec(seeded(InputResidual), torch.randn(4, 8))
    assert spec.names == ["fc1"]
    assert ("fc2.weight", 0) not in members(spec) and ("head.weight", 1) not in members(spec)


# --- flatten, depthwise, gates, concatenation, sequences ------------------------------------


class ViewFlatten(nn.Module):
    """conv -> pool -> x.view(x.size(0), -1) -> linear: 6 channels of 5x5 = 150 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(150, 12)
        self.out = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.out(F.relu(self.fc(x.view(x.size(0), -1))))


def test_flatten_into_linear_has_block_h_times_w() -> None:
    spec = trace_spec(seeded(MnistCNN), img())
    fc1 = next(m for m in spec.group("conv2").members if m.tensor == "fc1.weight")
    assert (fc1.axis, fc1.block) == (1, 7 * 7)
    spec = trace_spec(seeded(ViewFlatten), img(hw=12))
    fc = next(m for m in spec.group("conv").members if m.tensor == "fc.weight")
    assert (fc.axis, fc.block) == (1, 5 * 5)
    vgg = trace_spec(seeded(VGGStyle), img())
    cls0 = next(m for m in vgg.group("features.10").members if m.tensor == "classifier.0.weight")
    assert (cls0.axis, cls0.block) == (1, 3 * 3)


class MobileBlock(nn.Module):
    """Expansion conv + BN, depthwise conv (optionally x2 channel multiplier), SE gate, projection."""

    def __init__(self, mult: int = 1, se: bool = True) -> None:
        super().__init__()
        self.se = se
        self.expand = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8)
        self.se_reduce = nn.Conv2d(8 * mult, 4, 1)
        self.se_expand = nn.Conv2d(4, 8 * mult, 1)
        self.project = nn.Conv2d(8 * mult, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.expand(x)))
        x = F.hardswish(self.dw(x))
        if self.se:
            s = self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(x, 1))))
            x = x * torch.sigmoid(s)
        x = self.project(x).mean((2, 3))
        return self.fc(F.gelu(x))


def test_depthwise_conv_and_squeeze_excitation_gate() -> None:
    spec = trace_spec(seeded(MobileBlock), img(c=3, hw=8))  # self-checked
    by = {(m.tensor, m.axis): m for m in spec.group("expand").members}
    # The depthwise conv moves with the channels it filters, and the SE gate multiplies those
    # same channels, so the gate's expansion conv joins the group too.
    assert {("dw.weight", 0), ("dw.bias", 0), ("se_expand.weight", 0), ("se_expand.bias", 0)} <= set(by)
    assert {("se_reduce.weight", 1), ("project.weight", 1), ("bn.running_mean", 0)} <= set(by)
    assert spec.names == ["expand", "se_reduce", "project"]
    # A depthwise channel multiplier m: output channel j reads input j // m, so the outputs
    # move in blocks of m (no SE here: a plain gate cannot be tied to a blocked layout).
    spec = trace_spec(seeded(MobileBlock, 2, False), img(c=3, hw=8))
    by = {(m.tensor, m.axis): m for m in spec.group("expand").members}
    assert by[("dw.weight", 0)].block == 2 and by[("dw.bias", 0)].block == 2 and by[("project.weight", 1)].block == 2


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.c(x)), 1), 1))


def test_channel_concatenation_gets_offsets() -> None:
    spec = trace_spec(seeded(Concat), img(c=3, hw=6))
    ca = next(m for m in spec.group("a").members if m.tensor == "c.weight")
    cb = next(m for m in spec.group("b").members if m.tensor == "c.weight")
    assert (ca.axis, ca.offset, cb.axis, cb.offset) == (1, 0, 1, 4)
    assert spec.names == ["a", "b", "c"]


class Sequence1d(nn.Module):
    """(N, C, L) conv1d, then (N, L, C) linear via transpose, mean over time, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.relu(self.conv(x)).transpose(1, 2))
        return self.head(F.relu(self.proj(x)).mean(1))


def test_sequence_model_with_transpose_and_layernorm() -> None:
    spec = trace_spec(seeded(Sequence1d), torch.randn(2, 4, 10))
    assert spec.names == ["conv", "proj"]
    assert {"norm.weight", "norm.bias", "proj.weight"} <= {m.tensor for m in spec.group("conv").members}


class PaddedConv(nn.Conv2d):
    """A conv subclass outside torch.nn (like EfficientNet's "same" padding convs): fx traces
    into its forward, so the graph holds F.pad and F.conv2d on the weight attribute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.weight, self.bias)


class Functional(nn.Module):
    """Functional conv/batch-norm/linear on parameters, and a transposed conv (weight axes swapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = PaddedConv(2, 6, 3)
        self.scale, self.shift = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2)
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.batch_norm(self.conv(x), self.mean, self.var, self.scale, self.shift))
        x = F.leaky_relu(self.up(x)).amax((2, 3))
        return F.linear(x, self.w)


def test_functional_forms_and_transposed_conv() -> None:
    spec = trace_spec(seeded(Functional), img(c=2, hw=5))  # self-checked
    assert spec.names == ["conv", "up"]
    conv = {(m.tensor, m.axis, m.role) for m in spec.group("conv").members}
    assert conv == {("conv.weight", 0, None), ("conv.bias", 0, None), ("scale", 0, None), ("shift", 0, None),
                    ("mean", 0, None), ("var", 0, None), ("up.weight", 0, "in")}  # fmt: skip
    up = {(m.tensor, m.axis, m.role) for m in spec.group("up").members}
    assert up == {("up.weight", 1, "out"), ("up.bias", 0, None), ("w", 1, None)}


# --- loud failures ----------------------------------------------------------------------------


def custom_channel_op(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


torch.fx.wrap("custom_channel_op")


class WithOp(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.op == "fft":
            x = torch.fft.fft2(x).real
        elif self.op == "custom":
            x = custom_channel_op(x)
        elif self.op == "cumsum":
            x = x.cumsum(1)
        elif self.op == "slice":
            x = x[:, :, 1:]
        return self.conv2(x)


@pytest.mark.parametrize("op, name", [("fft", "fft2"), ("custom", "custom_channel_op"), ("cumsum", "cumsum"), ("slice", "index")])
def test_unknown_op_fails_naming_it(op: str, name: str) -> None:
    with pytest.raises(TraceError, match=name) as e:
        trace_spec(WithOp(op), img(hw=8))
    assert "node" in str(e.value)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


class Shared(nn.Module):
    """One Linear applied twice: its rows would need two different permutations."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.stem, self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.tie = tie
        if tie:
            self.b.weight = self.a.weight  # tied: two names, one Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x) if self.tie else self.a(x))
        return self.head(x)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


def test_loud_failures() -> None:
    with pytest.raises(TraceError, match="grouped convolution 'b'"):
        trace_spec(Grouped(), img(hw=6))
    with pytest.raises(TraceError, match="used twice"):
        trace_spec(Shared(tie=False), torch.randn(2, 4))
    with pytest.raises(TraceError, match="tied weights: a.weight and b.weight"):
        trace_spec(Shared(tie=True), torch.randn(2, 4))
    with pytest.raises(TraceError, match="torch.fx cannot trace DataDependent"):
        trace_spec(DataDependent(), torch.randn(2, 4))
    with pytest.raises(TraceError, match="no permutable channels"):
        trace_spec(nn.Linear(4, 2), torch.randn(2, 4))
    with pytest.raises(TraceError, match="example input failed"):
        trace_spec(MLP(), torch.randn(2, 7))


def test_trace_leaves_the_module_as_it_was() -> None:
    model = seeded(ResNetStyle).train()
    model.layer1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_spec(model, img())
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- JSON and validation ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MLP, VGGStyle, ResNetStyle, MnistCNN])
def test_traced_spec_json_round_trips_and_validates(cls: type[nn.Module]) -> None:
    model = seeded(cls)
    spec = trace_spec(model, torch.randn(2, 64) if cls is MLP else img())
    again = Spec.from_json(spec.to_json())
    assert again == spec and again.meta["source"] == "trace"
    again.validate(model.state_dict())
    check_spec(model, again, torch.randn(3, 64) if cls is MLP else img(3))


# --- chain inference from a state dict -------------------------------------------------------


@pytest.mark.parametrize("cls", [MLP, VGGStyle, MnistCNN])
def test_chain_inference_matches_trace_on_chains_and_warns(cls: type[nn.Module]) -> None:
    model = seeded(cls)
    x = torch.randn(2, 64) if cls is MLP else img()
    with pytest.warns(UserWarning, match="guessed from tensor names and shapes"):
        guessed = infer_chain_spec(model.state_dict())
    traced = trace_spec(model, x)
    assert [(g.name, g.size, set(g.members)) for g in guessed.groups] == [
        (g.name, g.size, set(g.members)) for g in traced.groups
    ]
    check_spec(model, guessed, x)
    with pytest.warns(UserWarning):
        assert infer_spec(model.state_dict()) == guessed  # not BERT: falls back to the chain


class PlainResNet(nn.Module):
    """Residual blocks without any width change: the shapes chain, the guess is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.c2(F.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_chain_inference_on_residual_nets_fails_or_warns_wrongly() -> None:
    # With a width change, the 1x1 downsample shortcut breaks the chain: a clear SpecError.
    with pytest.raises(SpecError, match="downsample.0.weight"):
        infer_chain_spec(seeded(ResNetStyle).state_dict())
    # Without one, the shapes chain: the guess comes with its warning and is indeed wrong
    # (it permutes the residual stream's writers separately), which the self-check exposes.
    model = seeded(PlainResNet)
    with pytest.warns(UserWarning, match="branching"):
        guessed = infer_chain_spec(model.state_dict())
    with pytest.raises(TraceError, match="not function-preserving"):
        check_spec(model, guessed, img())
    assert len(trace_spec(model, img()).groups) == 2  # tracing gets it right: stem+c2 tied, c1


def test_chain_inference_refuses_shapes_that_do_not_chain() -> None:
    sd = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "b.weight": torch.zeros(2, 5)}
    with pytest.raises(SpecError, match="'a.weight' has 4 output channels but the next weight, 'b.weight'"):
        infer_chain_spec(sd)
    with pytest.raises(SpecError, match="1-D tensor 'a.bias' has 3 entries"):
        infer_chain_spec({"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(3), "b.weight": torch.zeros(2, 4)})
    with pytest.raises(SpecError, match="need at least 2"):
        infer_chain_spec({"a.weight": torch.zeros(4, 3)})
    with pytest.raises(SpecError, match="no built-in spec for family 'gpt9'"):
        infer_spec(sd, family="gpt9")


def test_infer_spec_uses_the_catalog_for_bert() -> None:
    transformers = pytest.importorskip("transformers")
    from findlady_core import catalog

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    sd = transformers.BertModel(cfg).state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = infer_spec(sd)
    assert not any("guessed" in str(w.message) for w in caught)  # the catalog is no guess
    assert spec == catalog.bert_spec(sd)
    assert any(g.name.endswith("attention.heads") for g in spec.groups)
