"""The reference's null (``findlady_core.null``): structureless tensors drawn when read, from
the tensor's own values, the same whatever the order of reading; no copy of the model held."""

from __future__ import annotations

import pytest
import torch

from findlady_core import null
from findlady_core.null import NullStateDict, draw, reference_null, tensor_seed
from findlady_core.report import mean_margins
from findlady_core.resync import resync
from findlady_core.solver import Work
from findlady_core.spec import Group, Member, Spec


def _chain(seed: int = 0, widths: tuple[int, ...] = (40, 64, 48, 10)) -> tuple[dict[str, torch.Tensor], Spec]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    groups = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        sd[f"l{i}.weight"] = torch.randn(b, a, generator=g)
        sd[f"l{i}.bias"] = torch.randn(b, generator=g)
    for i in range(len(widths) - 2):
        groups.append(Group(f"h{i}", widths[i + 1], (Member(f"l{i}.weight", 0), Member(f"l{i}.bias", 0),
                                                     Member(f"l{i + 1}.weight", 1))))
    sd["steps"] = torch.tensor(3)  # not floating: passed through
    return sd, Spec(tuple(groups))


def test_draws_depend_on_the_name_and_seed_not_on_the_order_of_reading() -> None:
    sd, _ = _chain()
    names = [k for k in sd if sd[k].is_floating_point()]
    a, b = NullStateDict(sd), NullStateDict(sd)
    first = {k: a[k].clone() for k in names}
    second = {k: b[k].clone() for k in reversed(names)}
    for k in names:
        assert torch.equal(first[k], second[k])
        assert torch.equal(NullStateDict(sd, cache_bytes=0)[k], first[k])  # drawn again: the same tensor
    assert not torch.equal(NullStateDict(sd, seed=1)["l0.weight"], first["l0.weight"])
    assert tensor_seed("l0.weight") != tensor_seed("l1.weight")
    assert NullStateDict(sd)["steps"] is sd["steps"]


def test_draws_keep_shape_dtype_and_values_but_not_structure() -> None:
    sd, _ = _chain()
    w = sd["l0.weight"].double()
    d = draw(w, "l0.weight")
    assert d.shape == w.shape and d.dtype == w.dtype
    assert bool(torch.isin(d.flatten(), w.flatten()).all())  # every entry is one of the tensor's values
    assert not torch.equal(d, w)
    # rows no longer match their own neuron better than any other
    cos = torch.nn.functional.normalize(w, dim=1) @ torch.nn.functional.normalize(d, dim=1).T
    assert float(cos.diagonal().mean()) < 0.3
    big = torch.randn(300, 400)  # more values than the table: draws from a sample of them
    db = draw(big, "big")
    assert bool(torch.isin(db.flatten(), big.flatten()).all())
    assert abs(float(db.std()) - float(big.std())) < 0.05


def test_the_solver_reads_a_null_per_access_and_holds_no_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    sd, spec = _chain()
    calls: list[str] = []
    real = null.draw

    def counting(t: torch.Tensor, name: str, seed: int = null.NULL_SEED) -> torch.Tensor:
        calls.append(name)
        return real(t, name, seed)

    monkeypatch.setattr(null, "draw", counting)
    lazy = NullStateDict(sd, cache_bytes=0)
    work = Work(lazy, spec, torch.device("cpu"))
    assert calls == []  # index maps are sized from shapes, nothing drawn
    assert not isinstance(work.t, dict)
    assert torch.equal(work.t["l1.weight"], lazy["l1.weight"])


def test_the_null_is_the_solver_on_drawn_weights_and_sits_near_zero() -> None:
    sd, spec = _chain()
    value = reference_null(sd, spec, device="cpu")
    direct = mean_margins(resync(sd, {k: NullStateDict(sd)[k] for k in sd}, spec, device="cpu"))[0]
    assert value == pytest.approx(direct, abs=1e-6)  # lazily or from a materialized copy: the same
    assert abs(value) < 0.05
    copy = mean_margins(resync(sd, sd, spec, device="cpu"))[0]
    assert copy > 0.5 > value  # a true copy stands far above its null


def test_assignments_among_candidates_equal_the_dense_ones_and_fall_back_without_a_matching() -> None:
    from scipy.optimize import linear_sum_assignment

    from findlady_core.assignment import CANDIDATES_MIN_NEURONS, _assign, _sparse_assign

    g = torch.Generator().manual_seed(4)
    n = CANDIDATES_MIN_NEURONS
    a = torch.nn.functional.normalize(torch.randn(n, 300, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, 300, generator=g), dim=1)
    s = a @ b.T  # structureless: the row argmax is no bijection
    rows, cols = linear_sum_assignment(s.double().numpy(), maximize=True)
    dense = torch.from_numpy(cols).long()[torch.from_numpy(rows).argsort()]
    assert torch.unique(s.argmax(1)).numel() < n
    assert torch.equal(_assign(s, null.CANDIDATES), dense)
    assert torch.equal(_assign(s), dense)
    # an outer product: every row's and column's best entries sit at high indices, so the
    # candidates hold no perfect matching and the dense assignment answers
    one = torch.arange(n, dtype=torch.float32)[:, None] * torch.arange(n, dtype=torch.float32)[None, :] / n**2
    one += 1e-4 * torch.rand(n, n, generator=g)
    assert _sparse_assign(one, 4) is None
    rows, cols = linear_sum_assignment(one.double().numpy(), maximize=True)
    assert torch.equal(_assign(one, 4), torch.from_numpy(cols).long()[torch.from_numpy(rows).argsort()])
