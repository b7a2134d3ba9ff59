"""The client-state codec (fedkd/state_codec.py): exact round trips of real model and
optimizer states and of every allowed value, refusal (with the path) of anything else at
encode time, no code run on decode, the former torch.save format, corrupt blobs."""

from __future__ import annotations

import enum
import fractions
import io
import os
import pickle
import posix
import zlib
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np
import pytest
import torch

from fedkd import state_codec
from fedkd.config import Spec
from fedkd.models import build_model
from fedkd.state_codec import MAGIC, decode_state, encode_state
from fedkd.training import make_optimizer

D, C = 12, 4
OPTIMIZERS = {"adam": Spec("adam"), "sgd": Spec("sgd", {"momentum": 0.9})}
EXTRA = {"h": [(1.0, 0.1, 3)], "a": np.arange(3), "losses": {"kd": torch.tensor(0.5)}}


def trained(arch: str, opt: str, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A student and its optimizer after one step on seeded data."""
    model = build_model(Spec(arch), (D,), C, seed=seed)
    optimizer = make_optimizer(OPTIMIZERS[opt], model, 0.01)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, D, generator=gen), torch.randint(C, (8,), generator=gen)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model, optimizer


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8)


def same(a: Any, b: Any, where: str = "state") -> None:
    """``b`` is ``a`` rebuilt: the same types (exactly), keys in the same order, tensors
    and arrays bit-equal with the same dtype and shape."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), where
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    else:
        assert a == b, where


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
def test_a_trained_state_round_trips_bit_for_bit(arch, opt):
    model, optimizer = trained(arch, opt)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": EXTRA}
    saved = decode_state(encode_state(state))
    same(state, saved)
    assert saved["model"]._metadata == state["model"]._metadata  # what load_state_dict reads
    assert isinstance(saved["optimizer"]["param_groups"][0]["params"][0], int)
    if opt == "adam":
        assert isinstance(saved["optimizer"]["param_groups"][0]["betas"], tuple)

    fresh, fresh_opt = trained(arch, opt, seed=1)  # other weights and moments
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    same(state["model"], fresh.state_dict())
    same(state["optimizer"], fresh_opt.state_dict())
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(2))
    for m, o in ((model, optimizer), (fresh, fresh_opt)):  # and both train on identically
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    same(model.state_dict(), fresh.state_dict())


def every_value() -> dict[Any, Any]:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(3, generator=gen)
    return {
        "float32": torch.randn(2, 3, generator=gen),
        "bfloat16": torch.randn(5, generator=gen).to(torch.bfloat16),
        "float16": torch.randn(4, generator=gen).half(),
        "float64 0-dim": torch.tensor(2.5, dtype=torch.float64),
        "bool": torch.tensor([True, False, True]),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "int64 empty": torch.zeros(0, 3, dtype=torch.int64),
        "bfloat16 empty": torch.zeros(2, 0, dtype=torch.bfloat16),
        "complex64": torch.randn(3, dtype=torch.complex64, generator=gen),
        "lazy conjugate": torch.randn(3, dtype=torch.complex128, generator=gen).conj(),
        "non-contiguous": torch.arange(12.0).reshape(3, 4).T,
        "strided slice": torch.arange(20, dtype=torch.int32)[::3],
        "expanded": torch.ones(1, 3).expand(4, 3),
        "requires_grad": torch.ones(2, requires_grad=True),
        "parameter": torch.nn.Parameter(torch.full((2, 2), 3.0)),
        "same tensor twice": [shared, shared],
        "size": torch.Size([2, 3]),
        "ndarray": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
        "0-d array": np.array(7, dtype=np.int16),
        "empty array": np.zeros((0, 2), dtype=np.float64),
        "bool array": np.array([True, False]),
        "structured": np.zeros(2, dtype=[("x", "<f4"), ("y", "<i2", (2,))]),
        "datetimes": np.array(["2024-01-02"], dtype="datetime64[D]"),
        "big-endian": np.arange(3, dtype=">i4"),
        "unicode array": np.array(["ab", "cdé"]),
        "numpy scalars": [
            np.float32(1.5),
            np.float64(2.5),
            np.int64(-3),
            np.uint8(200),
            np.bool_(True),
            np.complex64(1 + 2j),
            np.str_("hé"),
            np.bytes_(b"x"),
            np.datetime64("2024-01-02"),
        ],  # fmt: skip
        "plain": [None, True, False, 0, -(2**70), 1.5, float("inf"), 1 - 2j, "hé", b"\x00\xff"],
        "tuple": (1, (2, [3, {"deep": (4,)}]), ()),
        "tuple looking like a reference": ("O", {}, None),
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        0: "int key",
        -1.5: "float key",
        None: "None key",
        True: "bool key",
        (1, "x"): "tuple key",
        b"k": "bytes key",
        "empty": [[], {}, (), "", b""],
    }


def test_every_allowed_value_round_trips_with_its_type():
    state = every_value()
    saved = decode_state(encode_state(state))
    same(state, saved)
    assert saved["same tensor twice"][0] is saved["same tensor twice"][1]
    assert type(saved["parameter"]) is torch.nn.Parameter and saved["parameter"].requires_grad
    assert saved["non-contiguous"].is_contiguous()
    assert not saved["lazy conjugate"].is_conj()
    assert saved["fortran"].flags.f_contiguous
    assert saved["size"] == torch.Size([2, 3])


def test_decoded_tensors_and_arrays_are_writable_and_independent():
    state = {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.bfloat16), "n": np.zeros(4)}
    saved = decode_state(encode_state(state))
    saved["a"].add_(1)
    saved["b"].fill_(2)
    saved["n"][:] = 3
    assert saved["a"].tolist() == [1, 1, 1] and saved["b"].tolist() == [2, 2]
    assert saved["n"].tolist() == [3, 3, 3, 3]
    # each tensor owns only its own bytes (torch.save of one does not drag in the blob)
    assert saved["a"].untyped_storage().nbytes() == 12
    again = decode_state(encode_state(saved))  # and decoded states encode again
    same(saved, again)


def test_a_cuda_tensor_stays_on_the_cpu_without_a_gpu(monkeypatch):
    blob = encode_state({"x": torch.arange(4.0)})
    blob = rebuild(blob, lambda table: [table[0][:5] + ("cuda:0",) + table[0][6:]])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x = decode_state(blob)["x"]
    assert x.device.type == "cpu" and x.tolist() == [0, 1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_tensor_goes_back_to_its_gpu():
    x = torch.arange(4.0, device="cuda")
    saved = decode_state(encode_state({"x": x, "bf": x.bfloat16()}))
    assert saved["x"].device == x.device and torch.equal(saved["x"], x)
    assert saved["bf"].device == x.device and torch.equal(saved["bf"], x.bfloat16())


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"f": fractions.Fraction(1, 3)}, r"extra\['f'\]: Fraction cannot be saved"),
        ({"a": np.array([1, None])}, r"extra\['a'\]: ndarray of dtype object"),
        ({"fn": [0, lambda: 0]}, r"extra\['fn'\]\[1\]: function"),
        ({"s": ({1, 2},)}, r"extra\['s'\]\[0\]: set"),
        ({"d": defaultdict(int)}, r"extra\['d'\]: defaultdict"),
        ({"e": Color.RED}, r"extra\['e'\]: Color"),
        ({frozenset(): 1}, r"extra key frozenset\(\): frozenset"),
        ({"sp": torch.eye(2).to_sparse()}, r"extra\['sp'\]: Tensor \(torch.sparse_coo"),
        ({"m": torch.empty(2, device="meta")}, r"extra\['m'\]: Tensor on meta"),
    ],
)
def test_anything_else_is_refused_at_encode_naming_its_path(extra, message):
    with pytest.raises(TypeError, match=message) as err:
        encode_state({"model": {}, "optimizer": {}, "extra": extra})
    assert "keep node.state to tensors" in str(err.value)


def test_refusing_the_root_itself_names_the_state():
    with pytest.raises(TypeError, match=r"^state: set"):
        encode_state({1})


# --- blobs made by hand -------------------------------------------------------------------


def parts(blob: bytes) -> tuple[list, bytes, bytes]:
    """The table (unpickled), structure and data of ``blob``."""
    head = state_codec._HEAD
    _, n_table, n_struct, _, _ = head.unpack_from(blob)
    table = blob[head.size : head.size + n_table]
    return (
        pickle.loads(table),
        blob[head.size + n_table : head.size + n_table + n_struct],
        blob[head.size + n_table + n_struct :],
    )


def assemble(table: bytes, structure: bytes, data: bytes) -> bytes:
    """A blob with a valid header (lengths and CRC) around any table and structure."""
    crc = zlib.crc32(structure, zlib.crc32(table))
    head = state_codec._HEAD.pack(MAGIC, len(table), len(structure), len(data), crc)
    return head + table + structure + data


def rebuild(blob: bytes, edit: Any) -> bytes:
    """``blob`` with its table replaced by ``edit(table)``."""
    table, structure, data = parts(blob)
    return assemble(pickle.dumps(edit(table), protocol=5), structure, data)


class Pwned:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("where", ["structure", "table"])
def test_a_blob_that_would_run_code_is_refused_without_running_it(where, monkeypatch, capfd):
    evil = pickle.dumps({"model": Pwned()}, protocol=5)
    table, structure, data = parts(encode_state({"x": torch.ones(2)}))
    table = pickle.dumps(table, protocol=5)
    blob = assemble(evil, structure, data) if where == "table" else assemble(table, evil, data)
    calls = []
    monkeypatch.setattr(os, "system", calls.append)
    monkeypatch.setattr(posix, "system", calls.append)
    with pytest.raises(ValueError, match=r"unsafe client state: it refers to \w+\.system"):
        decode_state(blob)
    assert calls == [] and "pwned" not in capfd.readouterr().out


def test_a_table_entry_for_python_objects_is_refused():
    blob = encode_state({"x": np.arange(3)})
    blob = rebuild(blob, lambda table: [("A", "|O", (3,), 0, 24, False)])
    with pytest.raises(ValueError, match="unsafe client state: an array of Python objects"):
        decode_state(blob)


def test_a_torch_save_blob_still_loads():
    model, optimizer = trained("mlp", "adam")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": EXTRA}
    buf = io.BytesIO()
    torch.save(state, buf)  # what fedkd.client.dump_state wrote before this codec
    same(state, decode_state(buf.getvalue()))


def test_a_torch_save_blob_with_code_is_refused():
    buf = io.BytesIO()
    torch.save({"model": {}, "optimizer": {}, "extra": {"f": fractions.Fraction(1, 3)}}, buf)
    with pytest.raises(RuntimeError, match="cannot be loaded without running pickled code"):
        decode_state(buf.getvalue())


def test_a_blob_in_neither_format_is_refused():
    for blob in (b"", b"hello world", pickle.dumps({"a": 1})):
        with pytest.raises(ValueError, match="not a saved client state"):
            decode_state(blob)


def test_truncated_padded_or_flipped_blobs_raise_value_error():
    model, optimizer = trained("cnn1d", "adam")
    blob = encode_state({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    for n in [*range(0, 200, 7), len(blob) // 2, len(blob) - 1]:
        with pytest.raises(ValueError):
            decode_state(blob[:n])
    with pytest.raises(ValueError, match="truncated or padded"):
        decode_state(blob + b"\x00")
    head = state_codec._HEAD.size
    for i in (head, head + 40, head + 200):  # in the table or the structure
        flipped = bytearray(blob)
        flipped[i] ^= 0x10
        with pytest.raises(ValueError, match="CRC-32"):
            decode_state(bytes(flipped))


@pytest.mark.parametrize(
    "entry",
    [
        ("T", "float32", (5,), 0, 20, "cpu", 0),  # longer than the data
        ("T", "float32", (4,), 16, 16, "cpu", 0),  # past the end
        ("T", "float32", (4,), 4, 16, "cpu", 0),  # misaligned
        ("T", "float32", (2, 2), 0, 12, "cpu", 0),  # nbytes disagrees with the shape
        ("T", "float32", (-4,), 0, 16, "cpu", 0),  # negative
        ("T", "float32", (-2, -2), 0, 16, "cpu", 0),
        ("T", "float32", (4.0,), 0, 16, "cpu", 0),
        ("T", "float32", [4], 0, 16, "cpu", 0),
        ("T", "float32", (1,) * 100, 0, 4, "cpu", 0),  # too many dimensions
        ("T", "qint8", (4,), 0, 4, "cpu", 0),
        ("T", "os.system", (4,), 0, 16, "cpu", 0),
        ("T", "int64", (2,), 0, 16, "cpu", 1),  # requires_grad on integers
        ("T", "float32", (4,), 0, 16, "nowhere", 0, "extra"),
        ("T", "float32"),
        ("A", "<f4", (4,), 0, 16, "no"),
        ("A", ["object"], (4,), 0, 16, False),
        ("A", {"descr": "<f4"}, (4,), 0, 16, False),
        ("S", "<f4", b"\x00"),
        ("C", 1, 2),
        ("Z", (1.5,)),
        ("X", 1),
        "T",
        (),
    ],
)
def test_inconsistent_table_entries_raise_value_error(entry):
    blob = rebuild(encode_state({"x": torch.arange(4.0)}), lambda table: [entry])
    with pytest.raises(ValueError, match="corrupt client state"):
        decode_state(blob)


@pytest.mark.parametrize("ref", [1, -1, True, "T", ("O", [], None), ("O", {}, 3), ("T", 0)])
def test_bad_references_in_the_structure_raise_value_error(ref):
    class Refs(pickle.Pickler):
        def persistent_id(self, obj):
            return ref if obj is marker else None

    marker, buf = object(), io.BytesIO()
    Refs(buf, protocol=5).dump({"x": marker})
    table, _, data = parts(encode_state({"x": torch.arange(4.0)}))
    with pytest.raises(ValueError, match="corrupt client state"):
        decode_state(assemble(pickle.dumps(table), buf.getvalue(), data))


def test_a_structure_cannot_point_a_tensor_past_its_bytes():
    """Pickle's BUILD opcode calls ``Tensor.__setstate__``, i.e. ``set_(source, offset,
    size, stride)``: decoded tensors own non-resizable storage, so this cannot reach
    memory outside the blob."""
    table, _, data = parts(encode_state({"a": torch.arange(4.0), "b": torch.arange(2.0)}))

    def i32(n: int) -> bytes:
        return b"J" + n.to_bytes(4, "little", signed=True)

    for size, stride in ((10**6, 1), (5, 1), (2, -1)):
        ops = (  # a = ref 0; a.__setstate__((ref 1, 0, (size,), (stride,)))
            b"\x80\x05K\x00Q(K\x01Q" + i32(0) + b"(" + i32(size) + b"t(" + i32(stride) + b"ttb."
        )
        with pytest.raises(ValueError, match="corrupt client state"):
            decode_state(assemble(pickle.dumps(table), ops, data))
