"""One compatibility check for the core, the CLI and the service (``findlady_core.compat``)."""

from __future__ import annotations

import pytest
import torch

from findlady_core.compat import IncompatibleError, check_compatible, shapes_of
from findlady_core.errors import InputError
from findlady_core.report import neuron_margins
from findlady_core.resync import margins

REF = {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(0)}


def test_shapes_of_drops_the_torch_prefix() -> None:
    assert shapes_of(REF) == {"fc.weight": [[4, 3], "float32"], "fc.bias": [[4], "float32"],
                              "bn.num_batches_tracked": [[], "int64"]}


@pytest.mark.parametrize("as_shapes", [False, True])
@pytest.mark.parametrize(
    "change, code, words",
    [
        (lambda sd: sd.pop("fc.bias"), "shape_mismatch", "'fc.bias' of the reference is missing"),
        (lambda sd: sd.update({"fc.weight": torch.zeros(4, 2)}), "shape_mismatch", "has shape (4, 2), the reference has (4, 3)"),
        (lambda sd: sd.update({"fc.bias": torch.zeros(4, dtype=torch.int32)}), "dtype_mismatch", "has dtype int32"),
        (lambda sd: sd.update({"extra": torch.zeros(1)}), "shape_mismatch", "'extra' is not in the reference"),
    ],
)
def test_mismatches_name_the_tensor_and_carry_a_code(change, code, words, as_shapes) -> None:  # type: ignore[no-untyped-def]
    sus = dict(REF)
    change(sus)
    with pytest.raises(IncompatibleError, match="suspect: tensor") as e:
        check_compatible(shapes_of(REF) if as_shapes else REF, shapes_of(sus) if as_shapes else sus)
    assert isinstance(e.value, InputError) and e.value.code == code and words in str(e.value)


def test_another_float_precision_fits_and_names_limit_the_check() -> None:
    check_compatible(REF, {**REF, "fc.weight": torch.zeros(4, 3, dtype=torch.float16)})
    check_compatible(REF, {"fc.weight": torch.zeros(4, 3), "other": torch.zeros(2)}, names=["fc.weight"])


def test_one_margin_for_resync_and_report() -> None:
    """matched minus the best alternative in the row or in the match's column"""
    s = torch.tensor([[0.9, 0.8, 0.0], [0.85, 0.95, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    p = torch.tensor([0, 1, 2])
    # neuron 0: row alternative 0.8 but column alternative 0.85; neuron 1: row alternative 0.85
    assert margins(s, p).tolist() == pytest.approx([0.05, 0.1, 0.5])
    assert neuron_margins(s).tolist() == pytest.approx(margins(s, p).tolist())
