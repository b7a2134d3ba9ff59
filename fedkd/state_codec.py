"""A fast, code-free codec for a client's saved state (model, optimizer and ``node.state``).

Every client round restores and saves its state, so ``torch.save``/``torch.load`` (a zip
file, a pickle and a record per tensor: milliseconds for a small model) is replaced by one
flat blob:

    b"FEDKDST1" | u64 table length | u64 structure length | u64 data length
    | u32 CRC-32 of table and structure | table | structure | data

- *data*: every tensor's and array's raw bytes, each at an offset that is a multiple of 16.
- *structure*: a pickle (protocol 5) of the state in which each tensor, NumPy array, NumPy
  scalar, complex number and ``torch.Size`` is a *persistent id*, an int indexing the
  table. Pickle keeps persistent ids apart from data (its ``BINPERSID`` opcode), so a
  reference cannot collide with a user's value and nothing needs escaping. An
  ``OrderedDict`` (``state_dict()``'s type) is the persistent id ``("O", items,
  _metadata)``: it comes back an ``OrderedDict`` with the version metadata that
  ``load_state_dict`` reads, as from ``torch.load``.
- *table*: a pickle of a list of plain tuples, one per reference:
  ``("T", dtype name, shape, offset, nbytes, device, flags)`` a tensor (``flags``: 1
  ``requires_grad``, 2 ``nn.Parameter``), ``("A", dtype descr, shape, offset, nbytes,
  fortran)`` an array, ``("S", dtype descr, raw bytes)`` a NumPy scalar (``np.float32(1)``
  stays one), ``("C", real, imag)`` a complex, ``("Z", dims)`` a ``torch.Size``.

Safety: decoding never runs code. Both pickles are read by an unpickler whose
``find_class`` refuses every global (pickle's extension codes go through it too), so they
can only build builtin containers, numbers, strings and bytes, plus what
``persistent_load`` makes from checked table entries: tensors, arrays and scalars over raw
bytes whose dtype (never ``object``), shape and extent are checked against the data
section. None of these is callable, so ``REDUCE``/``NEWOBJ`` have nothing to call. Every
length is checked against the header and table and structure against their CRC, so a
truncated or corrupt blob raises ``StateBlobError`` (a ``ValueError``); data bytes are not
checksummed (as with ``torch.load``), to keep decoding fast.

Decoded tensors and arrays are writable and not copied one by one: each wraps its own
range of one ``bytearray`` (the data section), which stays alive while any of them does.
Blobs written by ``torch.save`` (the former format, a zip file) still load, with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

MAGIC = b"FEDKDST1"
_HEAD = struct.Struct("<8sQQQI")  # magic, table, structure and data lengths, CRC-32
_ALIGN = 16  # every array's offset in the data section: a multiple of any itemsize
_PROTOCOL = 5
_REQUIRES_GRAD, _PARAMETER = 1, 2
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, tuple, dict})
_ALLOWED = (
    "keep node.state to tensors, NumPy arrays (not object dtype) and scalars, None, bool, "
    "int, float, complex, str, bytes, lists, tuples and dicts"
)
_TORCH_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype) and not str(d).startswith("torch.q")  # quantized: no raw view
}
_DTYPE_NAMES = {d: n for n, d in _TORCH_DTYPES.items()}
_NUMPY_TWINS = "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 float32 float64"
_AS_NUMPY = {  # torch dtypes with a NumPy twin (the rest are stored and read as raw bytes)
    _TORCH_DTYPES[n]: np.dtype(n)
    for n in f"{_NUMPY_TWINS} complex64 complex128".split()
    if n in _TORCH_DTYPES
}


class StateBlobError(ValueError):
    """A blob that is not a client state this module can read: truncated, corrupt, or
    asking to run code."""


class _Refused(Exception):
    """A value the codec does not store (found by ``persistent_id``; located afterwards)."""

    def __init__(self, obj: Any, why: str = "") -> None:
        super().__init__(why)
        self.obj, self.why = obj, why


class _Pickler(pickle.Pickler):
    """Pickles plain data; tensors, arrays and the few other allowed types become table
    entries (their bytes go to ``parts``); anything else raises ``_Refused``."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self.table: list[tuple] = []
        self.parts: list[Any] = []
        self.size = 0  # of the data section so far
        self.seen: dict[int, tuple[Any, int]] = {}  # id -> (object kept alive, its index)

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _PLAIN:
            return None
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return self._shared(obj, self._tensor)
        if kind is np.ndarray:
            return self._shared(obj, self._array)
        if kind is OrderedDict:
            return ("O", dict(obj), getattr(obj, "_metadata", None))
        if isinstance(obj, np.generic):
            descr = np.lib.format.dtype_to_descr(_checked_np_dtype(obj))
            return self._entry(("S", descr, np.asarray(obj).tobytes()))
        if kind is complex:
            return self._entry(("C", obj.real, obj.imag))
        if kind is torch.Size:
            return self._entry(("Z", tuple(obj)))
        raise _Refused(obj)

    def _entry(self, entry: tuple) -> int:
        self.table.append(entry)
        return len(self.table) - 1

    def _shared(self, obj: Any, make: Any) -> int:
        """The same object twice is stored once (and decoded as one object)."""
        hit = self.seen.get(id(obj))
        if hit is None:
            hit = self.seen[id(obj)] = (obj, self._entry(make(obj)))
        return hit[1]

    def _put(self, buf: Any, nbytes: int) -> int:
        """Append ``buf`` (``nbytes`` long) to the data section; its aligned offset."""
        pad = -self.size % _ALIGN
        if pad:
            self.parts.append(bytes(pad))
        offset = self.size + pad
        if nbytes:
            self.parts.append(buf)
        self.size = offset + nbytes
        return offset

    def _tensor(self, t: torch.Tensor) -> tuple:
        try:  # the common case, a CPU tensor with a NumPy dtype: no copy
            raw, device = t.detach().numpy(), "cpu"
        except (TypeError, RuntimeError):  # on a GPU, bfloat16, a lazy conjugate...
            raw, device = _raw_bytes(t), str(t.device)
        raw = raw if raw.flags.c_contiguous else np.ascontiguousarray(raw)
        flags = (_REQUIRES_GRAD if t.requires_grad else 0) | (
            _PARAMETER if type(t) is torch.nn.Parameter else 0
        )
        name, shape, nbytes = _DTYPE_NAMES[t.dtype], tuple(t.shape), raw.nbytes
        return ("T", name, shape, self._put(raw, nbytes), nbytes, device, flags)

    def _array(self, a: np.ndarray) -> tuple:
        dtype = _checked_np_dtype(a)
        fortran = a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous
        src = np.ascontiguousarray(a.T if fortran else a)
        buf = src.reshape(-1).view(np.uint8)
        descr = np.lib.format.dtype_to_descr(dtype)
        return ("A", descr, a.shape, self._put(buf, src.nbytes), src.nbytes, fortran)


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of ``t`` (any dense tensor, on any device) as a flat uint8 array."""
    if t.layout != torch.strided or t.dtype not in _DTYPE_NAMES or t.is_nested:
        raise _Refused(t, f" ({t.layout}, {t.dtype}): only dense tensors are stored")
    try:
        src = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
        return src.reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, NotImplementedError, TypeError) as err:  # e.g. a meta tensor
        raise _Refused(t, f" on {t.device} ({err})") from err


def _checked_np_dtype(obj: np.ndarray | np.generic) -> np.dtype:
    if obj.dtype.hasobject:
        raise _Refused(obj, f" of dtype {obj.dtype}: object arrays need pickled code")
    return obj.dtype


def encode_state(obj: Any) -> bytes:
    """``obj`` (a client's state: nested dicts, lists and tuples of tensors, arrays and
    plain values) as one blob for :func:`decode_state`. Raises ``TypeError`` naming the
    path of the first value it cannot store (instead of failing when it is loaded)."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    try:
        pickler.dump(obj)
    except _Refused as err:
        path = _locate(obj, err.obj, "")
        where = "state" if path == "" else path or "somewhere in the state"
        raise TypeError(
            f"{where}: {type(err.obj).__name__}{err.why} cannot be saved in a client's state; "
            f"{_ALLOWED}"
        ) from None
    table, structure = pickle.dumps(pickler.table, protocol=_PROTOCOL), buf.getvalue()
    crc = zlib.crc32(structure, zlib.crc32(table))
    head = _HEAD.pack(MAGIC, len(table), len(structure), pickler.size, crc)
    return b"".join([head, table, structure, *pickler.parts])


def _join(path: str, key: Any) -> str:
    return key if path == "" and type(key) is str else f"{path}[{key!r}]"


def _locate(obj: Any, target: Any, path: str) -> str | None:
    """The path of ``target`` in ``obj`` (``extra['f'][0]``), ``None`` if it is not there."""
    if obj is target:
        return path
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _locate(key, target, f"{path} key {key!r}".lstrip())
            found = found if found is not None else _locate(value, target, _join(path, key))
            if found is not None:
                return found
        meta = getattr(obj, "_metadata", None)
        return None if meta is None else _locate(meta, target, f"{path}._metadata")
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _locate(value, target, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def decode_state(blob: bytes | bytearray | memoryview) -> Any:
    """The state :func:`encode_state` (or, formerly, ``torch.save``) wrote into ``blob``,
    rebuilt without running any pickled code."""
    view = memoryview(blob)
    if view[: len(MAGIC)] == MAGIC:
        return _decode(view)
    if view[:2] == b"PK":  # a zip file: torch.save's format, before this codec
        return _load_torch_state(blob)
    raise StateBlobError(
        f"not a saved client state: starts with {bytes(view[:8])!r}, neither {MAGIC!r} "
        "(fedkd's state codec) nor b'PK' (a torch.save zip file)"
    )


def _decode(view: memoryview) -> Any:
    """A blob in this module's format; ``ValueError`` if it is truncated or corrupt."""
    if len(view) < _HEAD.size:
        raise StateBlobError(f"corrupt client state: {len(view)} bytes, shorter than its header")
    _, n_table, n_struct, n_data, crc = _HEAD.unpack_from(view)
    if len(view) != _HEAD.size + n_table + n_struct + n_data:
        raise StateBlobError(
            f"corrupt client state: {len(view)} bytes, but its header announces {_HEAD.size} "
            f"+ {n_table} + {n_struct} + {n_data} (header, table, structure, data): "
            "truncated or padded"
        )
    table = view[_HEAD.size : _HEAD.size + n_table]
    structure = view[_HEAD.size + n_table : _HEAD.size + n_table + n_struct]
    if zlib.crc32(structure, zlib.crc32(table)) != crc:
        raise StateBlobError("corrupt client state: its table and structure fail their CRC-32")
    data = bytearray(view[_HEAD.size + n_table + n_struct :])  # writable, for every array
    try:
        entries = _load_plain(_PlainUnpickler, table)
        if type(entries) is not list:
            raise StateBlobError("corrupt client state: its table is not a list")
        return _load_plain(lambda f: _Unpickler(f, entries, data), structure)
    except StateBlobError:
        raise
    except Exception as err:  # anything the pickle VM (or NumPy, torch) hits on bad input
        raise StateBlobError(f"corrupt client state ({type(err).__name__}: {err})") from err


def _load_plain(unpickler: Any, raw: memoryview) -> Any:
    """Unpickle all of ``raw`` (and nothing after its end) with ``unpickler(file)``."""
    stream = io.BytesIO(raw)
    obj = unpickler(stream).load()
    if stream.tell() != len(raw):
        raise StateBlobError("corrupt client state: bytes after the end of a pickle")
    return obj


class _PlainUnpickler(pickle.Unpickler):
    """Builds builtin data only: refuses every global (and, lacking ``persistent_load``,
    every persistent id)."""

    def find_class(self, module: str, name: str) -> Any:
        raise StateBlobError(
            f"unsafe client state: it refers to {module}.{name}, and loading it would run "
            "code; refusing to (a saved state holds data only)"
        )


class _Unpickler(_PlainUnpickler):
    """Builds the structure: builtin data, and tensors and arrays from checked entries."""

    def __init__(self, file: io.BytesIO, table: list, data: bytearray) -> None:
        super().__init__(file)
        self.table, self.data = table, data
        self.made: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is int:
            obj = self.made.get(pid, self)  # ``self``: not made yet
            if obj is self:
                obj = self.made[pid] = self._make(pid)
            return obj
        if type(pid) is tuple and len(pid) == 3 and pid[0] == "O":
            return _ordered_dict(pid[1], pid[2])
        raise StateBlobError(f"corrupt client state: unknown reference {pid!r:.80}")

    def _make(self, index: int) -> Any:
        entry = self.table[index] if 0 <= index < len(self.table) else None
        if type(entry) is not tuple or not entry or entry[0] not in _LOADERS:
            raise StateBlobError(f"corrupt client state: bad table entry {entry!r:.80}")
        return _LOADERS[entry[0]](self, *entry[1:])

    def span(self, shape: Any, itemsize: int, offset: Any, nbytes: Any) -> int:
        """The element count of ``shape`` (a tuple of non-negative ints), after checking
        that it fills ``nbytes`` bytes at ``offset``, aligned, inside the data section."""
        count = math.prod(shape) if type(shape) is tuple else None
        if type(count) is not int or min(shape, default=0) < 0:  # a float or str: not int
            raise StateBlobError(f"corrupt client state: bad shape {shape!r:.80}")
        if type(offset) is not int or type(nbytes) is not int or offset % _ALIGN:
            raise StateBlobError("corrupt client state: bad array offset")
        if count * itemsize != nbytes or offset < 0 or offset + nbytes > len(self.data):
            raise StateBlobError(
                f"corrupt client state: an array of shape {shape} ({nbytes} bytes at "
                f"{offset}) does not fit its {len(self.data)}-byte data section"
            )
        return count

    def tensor(
        self, name: Any, shape: Any, offset: Any, nbytes: Any, device: Any, flags: Any
    ) -> torch.Tensor:
        dtype = _TORCH_DTYPES.get(name) if type(name) is str else None
        if dtype is None or type(device) is not str or type(flags) is not int:
            raise StateBlobError(f"corrupt client state: bad tensor ({name!r:.40}, {device!r:.40})")
        count = self.span(shape, dtype.itemsize, offset, nbytes)
        twin = _AS_NUMPY.get(dtype)
        if not count:
            t = torch.empty(shape, dtype=dtype)
        elif twin is not None:  # through NumPy: faster than torch.frombuffer + reshape
            a = np.frombuffer(self.data, dtype=twin, count=count, offset=offset)
            t = torch.from_numpy(a.reshape(shape))
        else:
            t = torch.frombuffer(self.data, dtype=dtype, count=count, offset=offset)
            t = t.reshape(shape)
        if device != "cpu":
            t = _to_device(t, device)
        if not flags:
            return t
        if flags & _PARAMETER:
            return torch.nn.Parameter(t, requires_grad=bool(flags & _REQUIRES_GRAD))
        return t.requires_grad_() if flags & _REQUIRES_GRAD else t

    def array(self, descr: Any, shape: Any, offset: Any, nbytes: Any, fortran: Any) -> np.ndarray:
        dtype = _np_dtype(descr)
        count = self.span(shape, dtype.itemsize, offset, nbytes)
        if type(fortran) is not bool:
            raise StateBlobError("corrupt client state: bad array order")
        stored = shape[::-1] if fortran else shape
        if count and dtype.itemsize:
            a = np.frombuffer(self.data, dtype=dtype, count=count, offset=offset)
            a = a.reshape(stored)
        else:
            a = np.empty(stored, dtype=dtype)
        return a.T if fortran else a

    def scalar(self, descr: Any, raw: Any) -> np.generic:
        dtype = _np_dtype(descr)
        if type(raw) is not bytes or len(raw) != dtype.itemsize:
            raise StateBlobError("corrupt client state: bad NumPy scalar")
        return np.frombuffer(raw, dtype=dtype)[0] if raw else np.zeros((), dtype)[()]

    def complex(self, real: Any, imag: Any) -> complex:
        if type(real) is not float or type(imag) is not float:
            raise StateBlobError("corrupt client state: bad complex number")
        return complex(real, imag)

    def size(self, dims: Any) -> torch.Size:
        if type(dims) is not tuple or not all(type(n) is int for n in dims):
            raise StateBlobError("corrupt client state: bad torch.Size")
        return torch.Size(dims)


_LOADERS = {
    "T": _Unpickler.tensor,
    "A": _Unpickler.array,
    "S": _Unpickler.scalar,
    "C": _Unpickler.complex,
    "Z": _Unpickler.size,
}


def _ordered_dict(items: Any, metadata: Any) -> OrderedDict:
    if type(items) is not dict or not (metadata is None or isinstance(metadata, dict)):
        raise StateBlobError("corrupt client state: bad OrderedDict")
    out = OrderedDict(items)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _np_dtype(descr: Any) -> np.dtype:
    """The NumPy dtype ``descr`` (``np.lib.format``'s form) names, checked to hold data
    only: a string, or (for structured dtypes) lists and tuples of strings and ints."""
    if not _plain_descr(descr):
        raise StateBlobError(f"corrupt client state: bad dtype {descr!r:.80}")
    try:
        dtype = np.lib.format.descr_to_dtype(descr)
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise StateBlobError(f"corrupt client state: bad dtype {descr!r:.80}") from err
    if dtype.hasobject:
        raise StateBlobError("unsafe client state: an array of Python objects")
    return dtype


def _plain_descr(descr: Any, depth: int = 0) -> bool:
    if type(descr) in (str, int):
        return True
    return (
        type(descr) in (list, tuple)
        and depth < 32
        and all(_plain_descr(d, depth + 1) for d in descr)
    )


def _to_device(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t``, saved from device ``name``, back on it if that is a CUDA device this machine
    has; else (no such GPU, or another kind of device) left on the CPU."""
    if not name.startswith("cuda") or not torch.cuda.is_available():
        return t
    device = torch.device(name)
    index = torch.cuda.current_device() if device.index is None else device.index
    return t.to(device) if index < torch.cuda.device_count() else t


# --- the former format: torch.save's zip file ----------------------------------------------


def _safe_globals() -> list[Any]:
    """NumPy's array and scalar reconstruction (data only), for ``torch.load(weights_only=
    True)``."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]

    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def _load_torch_state(blob: bytes | bytearray | memoryview) -> Any:
    """A state written by ``torch.save``, loaded without unpickling code
    (``weights_only=True``, NumPy's data reconstruction allowed)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(io.BytesIO(blob), weights_only=True)
    except pickle.UnpicklingError as err:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(blob))
        raise RuntimeError(
            f"the client's saved state holds {', '.join(found) or 'a type'} that cannot be loaded "
            f"without running pickled code; {_ALLOWED}"
        ) from err
