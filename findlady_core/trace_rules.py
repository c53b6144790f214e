"""One trace rule per op: how each module type, function or ``Tensor`` method moves channels.

Adding a traced op is one decorated function here (or one more target in an existing rule's
table)::

    @rule(nn.Softmax2d)
    def _softmax2d(w: Walker, node: fx.Node, mod: nn.Module) -> Value:
        return w.tensor_arg(node.args[0], "Softmax2d")

A rule reads its inputs' layouts (``w.tensor_arg``), registers the tensor axes that move with
the channels (``w.add_layout``, ``w.produce``) and returns the output's layout, using the
walker's vocabulary (``linear``, ``conv``, ``norm``, ``reshape``, ``binary``...). Anything
without a rule is refused with a ``TraceError`` naming the op and the node.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from findlady_core.trace_graph import META, Value, Walker, _Meta, _op_name, rule

# ---------------------------------------------------------------------------------------------
# op tables

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
# Modules acting on the trailing k dims (spatial): the channel dim must lie before them.
_SPATIAL_MODULES: dict[type, int] = {}
for _k, _names in {
    1: ("MaxPool1d", "AvgPool1d", "AdaptiveAvgPool1d", "AdaptiveMaxPool1d", "LPPool1d", "ZeroPad1d",
        "ConstantPad1d", "ReflectionPad1d", "ReplicationPad1d", "CircularPad1d"),
    2: ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "LPPool2d", "ZeroPad2d",
        "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d", "CircularPad2d", "UpsamplingNearest2d",
        "UpsamplingBilinear2d"),
    3: ("MaxPool3d", "AvgPool3d", "AdaptiveAvgPool3d", "AdaptiveMaxPool3d", "ZeroPad3d", "ConstantPad3d",
        "ReflectionPad3d", "ReplicationPad3d", "CircularPad3d"),
}.items():  # fmt: skip
    for _n in _names:
        if hasattr(nn, _n):
            _SPATIAL_MODULES[getattr(nn, _n)] = _k

_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh,
    F.softsign, F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.exp, torch.abs, torch.neg,
    torch.sqrt, torch.square, torch.clamp, torch.clip, operator.neg, operator.pos,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "square",
    "clamp", "clamp_", "clip", "softmax", "log_softmax", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type_as",
}  # fmt: skip
_BINARY_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
# Pure integer arithmetic on sizes (e.g. ``x.size(0) * 2``) is fine; these never touch tensors.
_META_FUNCTIONS: set[Any] = {operator.floordiv, operator.mod, operator.pow}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS: set[Any] = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
_SPATIAL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
}  # fmt: skip
_CONV_FUNCTIONS: dict[Any, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _param(mod: nn.Module, name: str, attr: str) -> str | None:
    return f"{name}.{attr}" if getattr(mod, attr, None) is not None else None


# ---------------------------------------------------------------------------------------------
# modules


@rule(nn.Linear)
def _linear_module(w: Walker, node: fx.Node, mod: nn.Linear) -> Value:
    name = str(node.target)
    return w.linear(node.args[0], name, f"{name}.weight", _param(mod, name, "bias"), mod.out_features)


@rule(nn.Embedding)
def _embedding_module(w: Walker, node: fx.Node, mod: nn.Embedding) -> Value:
    # A lookup of integer ids: the output's last dim is the table's columns (its own neurons);
    # the ids themselves never move.
    name = str(node.target)
    return w.produce(mod.embedding_dim, len(w.shape(node)) - 1, name, f"{name}.weight", None, weight_axis=1)


@rule(*_CONV_MODULES, *_CONVT_MODULES)
def _conv_module(w: Walker, node: fx.Node, mod: Any) -> Value:
    name = str(node.target)
    transposed = isinstance(mod, _CONVT_MODULES)
    return w.conv(node.args[0], name, f"{name}.weight", _param(mod, name, "bias"), mod.groups, len(mod.kernel_size),
                  transposed=transposed)  # fmt: skip


@rule(*_BN_MODULES)
def _batch_norm_module(w: Walker, node: fx.Node, mod: nn.Module) -> Value:
    name, x = str(node.target), node.args[0]
    what = type(mod).__name__
    # BatchNorm wants a batch; InstanceNorm also takes unbatched (C, *spatial) input.
    dim = 1 if isinstance(mod, nn.modules.batchnorm._BatchNorm) else len(w.shape(x)) - int(what[-2]) - 1
    params = [_param(mod, name, a) for a in ("weight", "bias", "running_mean", "running_var")]
    return w.norm(x, params, dim, what)


@rule(nn.LayerNorm)
def _layer_norm_module(w: Walker, node: fx.Node, mod: nn.LayerNorm) -> Value:
    name = str(node.target)
    return w.layer_norm(node.args[0], tuple(mod.normalized_shape), _param(mod, name, "weight"), _param(mod, name, "bias"))


@rule(nn.GroupNorm)
def _group_norm_module(w: Walker, node: fx.Node, mod: nn.GroupNorm) -> Value:
    name = str(node.target)
    if mod.num_groups not in (1, mod.num_channels):
        raise w.fail(f"GroupNorm {name!r} with {mod.num_groups} groups of channels is not supported")
    return w.norm(node.args[0], [_param(mod, name, "weight"), _param(mod, name, "bias")], 1, "GroupNorm")


@rule(nn.PReLU)
def _prelu_module(w: Walker, node: fx.Node, mod: nn.PReLU) -> Value:
    if mod.weight.numel() == 1:
        return w.tensor_arg(node.args[0], "PReLU input")
    return w.norm(node.args[0], [_param(mod, str(node.target), "weight")], 1, "PReLU")


@rule(*_ELEMENTWISE_MODULES)
def _elementwise_module(w: Walker, node: fx.Node, mod: nn.Module) -> Value:
    return w.tensor_arg(node.args[0] if node.args else None, type(mod).__name__)


@rule(*_SPATIAL_MODULES)
def _spatial_module(w: Walker, node: fx.Node, mod: nn.Module) -> Value:
    k = next(_SPATIAL_MODULES[c] for c in type(mod).__mro__ if c in _SPATIAL_MODULES)
    return w.spatial(node.args[0], k, type(mod).__name__)


@rule(nn.Upsample)
def _upsample_module(w: Walker, node: fx.Node, mod: nn.Module) -> Value:
    x = node.args[0]
    return w.spatial(x, len(w.shape(x)) - 2, "Upsample")


@rule(nn.Flatten, nn.Unflatten)
def _flatten_module(w: Walker, node: fx.Node, mod: nn.Module) -> Value:
    return w.reshape(node.args[0], w.shape(node))


# ---------------------------------------------------------------------------------------------
# functions with parameter arguments


@rule(F.linear, *_CONV_FUNCTIONS, params=True)
def _linear_or_conv_function(w: Walker, node: fx.Node, _: None) -> Value:
    f = node.target
    wt, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    w.check_no_param_data(node, (wt, b))
    weight = w.param_name(wt, f"the weight of {node.name}")
    assert weight is not None
    bias = w.param_name(b, f"the bias of {node.name}")
    name = weight[: -len(".weight")] if weight.endswith(".weight") else weight
    if f is F.linear:
        return w.linear(node.args[0], name, weight, bias, w.shapes[weight][0])
    return w.conv(node.args[0], name, weight, bias, int(_arg(node, 6, "groups", 1)), _CONV_FUNCTIONS[f])


@rule(F.batch_norm, params=True)
def _batch_norm_function(w: Walker, node: fx.Node, _: None) -> Value:
    ps = [_arg(node, i, k) for i, k in ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))]
    w.check_no_param_data(node, tuple(ps))
    names = [w.param_name(a, f"a batch-norm tensor of {node.name}") for a in ps]
    return w.norm(node.args[0], names, 1, "batch_norm")


@rule(F.layer_norm, params=True)
def _layer_norm_function(w: Walker, node: fx.Node, _: None) -> Value:
    wt, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    w.check_no_param_data(node, (wt, b))
    ns = _arg(node, 1, "normalized_shape")
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    return w.layer_norm(node.args[0], ns, w.param_name(wt, "layer-norm weight"), w.param_name(b, "layer-norm bias"))


# ---------------------------------------------------------------------------------------------
# other functions (a parameter among their arguments is refused before they run)


@rule(*_ELEMENTWISE_FUNCTIONS)
def _elementwise_function(w: Walker, node: fx.Node, _: None) -> Value:
    return w.tensor_arg(node.args[0], _op_name(node))


@rule(*_BINARY_FUNCTIONS)
def _binary_function(w: Walker, node: fx.Node, _: None) -> Value:
    return w.binary(node.args[0], _arg(node, 1, "other"))


@rule(*_META_FUNCTIONS)
def _size_arithmetic(w: Walker, node: fx.Node, _: None) -> Value:
    if all(isinstance(w.value(a), _Meta) for a in node.args):
        return META
    raise w.unsupported(node)


@rule(operator.getitem)
def _getitem(w: Walker, node: fx.Node, _: None) -> Value:
    if isinstance(w.value(node.args[0]), _Meta):
        return META
    raise w.fail("indexing a tensor (x[...]) is not supported; trace cannot follow channel slices")


@rule(getattr)
def _getattr(w: Walker, node: fx.Node, _: None) -> Value:
    if node.args[1] in _META_ATTRS:
        return META
    raise w.fail(f"tensor attribute {node.args[1]!r} is not supported")


@rule(*_RESHAPE_FUNCTIONS)
def _reshape_function(w: Walker, node: fx.Node, _: None) -> Value:
    return w.reshape(node.args[0], w.shape(node))


@rule(*_REDUCE_FUNCTIONS)
def _reduce_function(w: Walker, node: fx.Node, _: None) -> Value:
    return w.reduce(node.args[0], _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)))


@rule(*_SPATIAL_FUNCTIONS)
def _spatial_function(w: Walker, node: fx.Node, _: None) -> Value:
    return w.spatial(node.args[0], _SPATIAL_FUNCTIONS[node.target], _op_name(node))


@rule(F.pad)
def _pad(w: Walker, node: fx.Node, _: None) -> Value:
    return w.spatial(node.args[0], len(_arg(node, 1, "pad")) // 2, "F.pad")


@rule(F.interpolate)
def _interpolate(w: Walker, node: fx.Node, _: None) -> Value:
    return w.spatial(node.args[0], len(w.shape(node.args[0])) - 2, "F.interpolate")


@rule(torch.cat, torch.concat)
def _cat(w: Walker, node: fx.Node, _: None) -> Value:
    return w.cat(_arg(node, 0, "tensors"), int(_arg(node, 1, "dim", 0)))


@rule(torch.transpose, torch.permute)
def _move_dims_function(w: Walker, node: fx.Node, _: None) -> Value:
    return w.move_dims(node, "transpose" if node.target is torch.transpose else "permute")


# ---------------------------------------------------------------------------------------------
# Tensor methods


@rule("size", "dim", "numel")
def _size_method(w: Walker, node: fx.Node, _: None) -> Value:
    return META


@rule(*_ELEMENTWISE_METHODS)
def _elementwise_method(w: Walker, node: fx.Node, _: None) -> Value:
    return w.tensor_arg(node.args[0], f"Tensor.{node.target}")


@rule(*_BINARY_METHODS)
def _binary_method(w: Walker, node: fx.Node, _: None) -> Value:
    return w.binary(node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"])


@rule(*_RESHAPE_METHODS)
def _reshape_method(w: Walker, node: fx.Node, _: None) -> Value:
    return w.reshape(node.args[0], w.shape(node))


@rule(*_REDUCE_METHODS)
def _reduce_method(w: Walker, node: fx.Node, _: None) -> Value:
    return w.reduce(node.args[0], _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)))


@rule("transpose", "permute")
def _move_dims_method(w: Walker, node: fx.Node, _: None) -> Value:
    return w.move_dims(node, str(node.target))
