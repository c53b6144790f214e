"""Safe weight I/O: round trips, and every kind of hostile or broken file is refused."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from findlady_core.errors import InputError, WeightsError
from findlady_core.io import count_parameters, file_sha256, load_state_dict, save_state_dict


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": torch.randn(5, 3, generator=g),
        "fc1.bias": torch.randn(5, generator=g),
        "bn.running_var": torch.rand(5, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(2, 2, generator=g).half(),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def _st_file(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """Write a safetensors file by hand, so its header can lie."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


class Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_zip(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None,
                 extra: dict[str, bytes] | None = None, compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy a torch.save archive member by member, optionally swapping or adding members."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(rel, zin.read(info.filename)))
        root = zin.infolist()[0].filename.split("/", 1)[0]
        for name, data in (extra or {}).items():
            zout.writestr(name.replace("<root>", root), data)
    return dst


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    sd = _sd()
    p = tmp_path / f"w{suffix}"
    save_state_dict(sd, p, metadata={"note": "x"} if suffix != ".pt" else None)
    _assert_same(sd, load_state_dict(p))
    assert count_parameters(sd) == 5 * 3 + 5 + 5 + 4
    assert len(file_sha256(p)) == 64


def test_format_from_magic_not_extension(tmp_path: Path) -> None:
    sd = _sd()
    st, pt = tmp_path / "a.pt.safetensors", tmp_path / "b.pt"
    save_state_dict(sd, st)
    save_state_dict(sd, pt)
    swapped_st, swapped_pt = tmp_path / "really_safetensors.pt", tmp_path / "really_torch.safetensors"
    os.replace(st, swapped_st)
    os.replace(pt, swapped_pt)
    _assert_same(sd, load_state_dict(swapped_st))
    _assert_same(sd, load_state_dict(swapped_pt))


def test_shared_and_strided_tensors_save(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    sd = {"a": w, "tied": w, "t": w.t(), "row": w[1]}
    p = tmp_path / "s.safetensors"
    save_state_dict(sd, p)
    back = load_state_dict(p)
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_state_dict_wrapper_unwrapped(tmp_path: Path) -> None:
    sd = _sd()
    p = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "epoch": 3}, p)
    _assert_same(sd, load_state_dict(p))


def test_parameters_become_plain_tensors(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    torch.save({"w": torch.nn.Parameter(torch.ones(2, 2))}, p)
    sd = load_state_dict(p)
    assert type(sd["w"]) is torch.Tensor and torch.equal(sd["w"], torch.ones(2, 2))


# ---------------------------------------------------------------- code execution refused


def test_payload_is_live(tmp_path: Path) -> None:
    """Guard for the tests below: unpickling the payload really does run code."""
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_plain_pickle_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    with pytest.raises(WeightsError, match="plain pickle"):
        load_state_dict(p)
    assert not marker.exists()


def test_legacy_torch_save_refused(tmp_path: Path) -> None:
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="plain pickle"):
        load_state_dict(p)


def test_zip_with_malicious_pickle_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    evil = _rewrite_zip(good, tmp_path / "evil.pt",
                        replace={"data.pkl": pickle.dumps({"w": Payload(marker)}, protocol=2)})
    with pytest.raises(WeightsError, match=r"weights_only=True\) refused.*system") as e:
        load_state_dict(evil)
    assert not marker.exists()
    assert "weights_only` set to `False`" not in str(e.value)  # torch's advice is not passed on


def test_torchscript_refused(tmp_path: Path) -> None:
    p = tmp_path / "ts.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(p))
    with pytest.raises(WeightsError, match="TorchScript"):
        load_state_dict(p)


# ---------------------------------------------------------------- zip archive checks


@pytest.fixture
def good_pt(tmp_path: Path) -> Path:
    p = tmp_path / "good.pt"
    torch.save(_sd(), p)
    return p


def test_compressed_zip_entry_refused(tmp_path: Path, good_pt: Path) -> None:
    p = _rewrite_zip(good_pt, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(WeightsError, match="compressed"):
        load_state_dict(p)


def test_too_many_entries_refused(good_pt: Path) -> None:
    n = len(zipfile.ZipFile(good_pt).infolist())
    assert load_state_dict(good_pt, max_entries=n)
    with pytest.raises(WeightsError, match="entries"):
        load_state_dict(good_pt, max_entries=n - 1)


@pytest.mark.parametrize("name", ["<root>/../evil", "/abs/data/9", "<root>/notes.txt", "other/data/9",
                                  "<root>/data/../../x"])
def test_unexpected_zip_members_refused(tmp_path: Path, good_pt: Path, name: str) -> None:
    p = _rewrite_zip(good_pt, tmp_path / "odd.pt", extra={name: b"x"})
    with pytest.raises(WeightsError, match="absolute or parent|one top-level|unexpected archive member"):
        load_state_dict(p)


def test_zip_without_data_pkl_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x/version", b"3\n")
    with pytest.raises(WeightsError, match="data.pkl"):
        load_state_dict(p)


def test_non_tensor_entries_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2), "epoch": 3}, p)
    with pytest.raises(WeightsError, match="'epoch' is a int"):
        load_state_dict(p)
    torch.save([torch.ones(2)], p)
    with pytest.raises(WeightsError, match="not a dict"):
        load_state_dict(p)


def test_stride_zero_bomb_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    torch.save({"w": torch.ones(1).expand(10_000, 10_000)}, p)
    assert p.stat().st_size < 10_000
    with pytest.raises(WeightsError, match="more memory than its storage"):
        load_state_dict(p)


# ---------------------------------------------------------------- size limits and junk


def test_max_bytes(tmp_path: Path) -> None:
    for suffix in (".safetensors", ".pt"):
        p = tmp_path / f"w{suffix}"
        save_state_dict(_sd(), p)
        size = p.stat().st_size
        assert load_state_dict(p, max_bytes=size)
        with pytest.raises(WeightsError, match="limit"):
            load_state_dict(p, max_bytes=size - 1)


def test_empty_missing_and_random_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_state_dict(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                         dtype=torch.uint8).tolist()))
    with pytest.raises(WeightsError, match="not a recognized weight file"):
        load_state_dict(junk)
    with pytest.raises(WeightsError, match="cannot read"):
        load_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="holds no model weights"):
        load_state_dict(tmp_path)  # a folder is read as a model folder: this one has none
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match="not a regular file"):
        load_state_dict(fifo)
    assert issubclass(WeightsError, InputError)


# ---------------------------------------------------------------- safetensors header checks


def test_truncated_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    save_state_dict(_sd(), p)
    data = p.read_bytes()
    p.write_bytes(data[:-3])
    with pytest.raises(WeightsError, match="truncated|data region"):
        load_state_dict(p)
    p.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(WeightsError, match="header length .* larger than the rest"):
        load_state_dict(p)


def test_header_length_lies(tmp_path: Path) -> None:
    hdr = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    p = _st_file(tmp_path / "w.safetensors", hdr, b"\0" * 8, header_len=10**6)
    with pytest.raises(WeightsError, match="larger than the rest of the file"):
        load_state_dict(p)
    p = _st_file(tmp_path / "w.safetensors", hdr, b"\0" * 8, header_len=2**63)
    with pytest.raises(WeightsError, match="exceeds the limit"):
        load_state_dict(p)


def test_hand_written_safetensors_loads(tmp_path: Path) -> None:
    """The hand-writer used below makes valid files when it does not lie."""
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}
    data = struct.pack("<ff", 1.5, -2.0) + struct.pack("<q", 9)
    sd = load_state_dict(_st_file(tmp_path / "ok.safetensors", hdr, data))
    assert sd["a"].tolist() == [1.5, -2.0] and sd["b"].tolist() == [9]


@pytest.mark.parametrize(
    "entries, data_len, match",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 8, "past the data region"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, "overlap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, 12, "need 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "hold -8 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "unused bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "trailing bytes"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, 0, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 0]}}, 0, "non-negative"),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, 1, "not supported"),
        ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8, "complex"),
        ({"a": {"dtype": "F32", "shape": [1]}}, 4, "exactly dtype"),
        ({"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4,
         "__metadata__"),
        ({}, 0, "no tensors"),
    ],
)
def test_lying_safetensors_headers(tmp_path: Path, entries: dict, data_len: int, match: str) -> None:
    p = _st_file(tmp_path / "w.safetensors", entries, b"\0" * data_len)
    with pytest.raises(WeightsError, match=match):
        load_state_dict(p)


def test_bad_json_and_duplicate_keys(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
          b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(WeightsError, match="twice"):
        load_state_dict(p)
    raw = b'{"a": [' + b"[" * 100_000
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_state_dict(p)


# ---------------------------------------------------------------- tensor value checks


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("bad, what", [(float("nan"), "1 NaN"), (float("inf"), "1 Inf"), (float("-inf"), "1 Inf")])
def test_non_finite_refused_naming_tensor(tmp_path: Path, suffix: str, bad: float, what: str) -> None:
    sd = _sd()
    sd["fc1.weight"][2, 1] = bad
    p = tmp_path / f"w{suffix}"
    save_state_dict(sd, p)
    with pytest.raises(WeightsError, match=rf"'fc1\.weight' has non-finite values .*{what}"):
        load_state_dict(p)


def test_complex_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.pt"
    torch.save({"w": torch.randn(2, 2, dtype=torch.complex64)}, p)
    with pytest.raises(WeightsError, match="'w' is complex"):
        load_state_dict(p)


def test_sparse_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.pt"
    torch.save({"w": torch.eye(3).to_sparse()}, p)
    with pytest.raises(WeightsError, match="layout"):
        load_state_dict(p)


def test_integer_buffers_allowed(tmp_path: Path) -> None:
    p = tmp_path / "i.safetensors"
    sd = {"w": torch.ones(2, 2), "position_ids": torch.arange(5)[None], "nbt": torch.tensor(3)}
    save_state_dict(sd, p)
    _assert_same(sd, load_state_dict(p))


def test_save_refuses_junk(tmp_path: Path) -> None:
    with pytest.raises(WeightsError):
        save_state_dict({}, tmp_path / "x.safetensors")
    with pytest.raises(WeightsError):
        save_state_dict({"a": [1, 2]}, tmp_path / "x.safetensors")  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())  # no temporary file left behind


# ---------------------------------------------------------------- memory-mapped loading


def test_mmap_load_is_zero_copy_and_private(tmp_path):
    """Mapped tensors equal the pread ones, alias one mapping, and writing to them never
    reaches the file (a private mapping)."""
    sd = {"a": torch.randn(64, 33).to(torch.bfloat16), "b": torch.randn(7), "i": torch.arange(5)}
    p = tmp_path / "m.safetensors"
    save_state_dict(sd, p)
    before = p.read_bytes()
    mapped = load_state_dict(p, mmap=True)
    plain = load_state_dict(p)
    assert set(mapped) == set(sd)
    for k in sd:
        assert mapped[k].dtype == sd[k].dtype and torch.equal(mapped[k], plain[k])
    assert mapped["a"].untyped_storage().data_ptr() == mapped["b"].untyped_storage().data_ptr()
    mapped["a"].zero_()
    assert p.read_bytes() == before
    assert torch.equal(load_state_dict(p, mmap=True)["a"], sd["a"])


def test_mmap_load_refuses_non_finite_values(tmp_path):
    t = torch.randn(10, 10)
    t[3, 4] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_state_dict({"w": t}, p)
    with pytest.raises(WeightsError, match=r"'w' has non-finite values \(1 NaN, 0 Inf\)"):
        load_state_dict(p, mmap=True)


def test_streamed_write_matches_save_file(tmp_path):
    from findlady_core.stream_io import write_safetensors

    sd = {"x": torch.randn(3, 5).to(torch.bfloat16), "y": torch.arange(6, dtype=torch.int32).view(2, 3), "z": torch.tensor(2.5)}
    p = tmp_path / "w.safetensors"
    write_safetensors(p, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], lambda k: sd[k], {"note": "x"})
    back = load_state_dict(p)
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    with pytest.raises(WeightsError, match="changed shape or dtype"):
        write_safetensors(tmp_path / "bad.safetensors", [("x", torch.float32, (3, 5))], lambda k: sd[k])
    assert not (tmp_path / "bad.safetensors").exists()
