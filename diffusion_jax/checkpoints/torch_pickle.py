"""A pickle virtual machine that admits only what a PyTorch tensor state dict needs.

`torch.save` pickles a tensor as a call of `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, backward_hooks)` (`_v3`, with an explicit dtype,
for uint16/32/64 and float8) and its storage as a persistent id `('storage',
torch.FloatStorage, key, location, numel)`; a `state_dict()` is an OrderedDict of
those, with its `_metadata` attached by BUILD.

`Unpickler` runs such a pickle without the `pickle` module: it implements only the
opcodes that plain data (numbers, strings, bytes, tuples, lists, dicts, sets) and these
calls use, and its only globals are `collections.OrderedDict`, the tensor and
parameter rebuild functions (replaced by stand-ins that record `PendingTensor`s),
storage types and dtypes, as strict as `torch.load(weights_only=True)`. Object-creating
opcodes (INST, OBJ, NEWOBJ, EXT*), BUILD on anything but an OrderedDict and every other
global (`os.system`, a `torch.nn.Module` class, ...) raise `Refused` before anything is
called, so a malicious file cannot run code. Malformed input raises `Corrupt`.
`diffusion_jax.checkpoints.torch_files` reads the containers around the pickle and the storages.
"""

from __future__ import annotations

import dataclasses
import pickletools
import struct
from collections import OrderedDict
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_MAX_PICKLE_PROTOCOL = 5

# torch.<Name>Storage (typed storages, `_rebuild_tensor_v2`) -> element dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
# torch.<dtype> globals (the dtype argument of `_rebuild_tensor_v3`): the storages' dtypes
# and those only `_v3` carries, by their numpy / ml_dtypes names.
_FLOAT8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_TORCH_DTYPES = {
    **{np.dtype(t).name: t for t in _STORAGE_DTYPES.values()},
    **{name: np.dtype(name) for name in ("uint16", "uint32", "uint64")},
    **{name: getattr(ml_dtypes, name) for name in _FLOAT8},
}


class Refused(Exception):
    """The pickle asks for something a tensor state dict never needs (message: what)."""


class Corrupt(Exception):
    """The bytes do not form a valid torch pickle (truncated, inconsistent, ...)."""


class _StorageType:
    """Stand-in for `torch.<Name>Storage` / `torch.storage.UntypedStorage`."""

    def __init__(self, dtype: Any, untyped: bool = False):
        self.dtype = np.dtype(dtype)
        self.untyped = untyped


class _DType:
    """Stand-in for a `torch.<dtype>` global."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


class Storage:
    """One storage of the file: raw bytes read on first use (zip) or after the pickle (legacy)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, nbytes: int):
        self.key, self.dtype, self.numel, self.nbytes = key, dtype, numel, nbytes
        self.buffer: bytearray | None = None
        self.base: Storage | None = None  # legacy storage views: (root, byte offset)
        self.byte_offset = 0


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor whose storage bytes may not be read yet (legacy files store them last)."""

    storage: Storage
    offset: int  # in elements of `dtype`, as size and stride
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise Corrupt(f"tensor {what} {value!r} is not a tuple of ints")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, hooks, dtype=None):
    if not isinstance(storage, Storage):
        raise Corrupt("a tensor is rebuilt from something that is not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise Corrupt(f"tensor storage offset {storage_offset!r} is not an int >= 0")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or len(size) > 32 or min(size + stride, default=0) < 0:
        raise Corrupt(f"tensor size {size} and stride {stride} do not describe a tensor")
    if not isinstance(requires_grad, bool) or not isinstance(hooks, dict) or hooks:
        raise Refused("a tensor with backward hooks or a non-bool requires_grad")
    if dtype is None:
        if storage.dtype is None:
            raise Corrupt("an untyped storage is used without a dtype")
        dtype = storage.dtype
    return PendingTensor(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
    del metadata  # torch keeps e.g. conjugate/negative bits here; plain state dicts have none
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, hooks)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None
):
    del metadata
    if not isinstance(dtype, _DType):
        raise Corrupt(f"tensor dtype {dtype!r} is not a torch dtype")
    return _rebuild_tensor(
        storage, storage_offset, size, stride, requires_grad, hooks, dtype=dtype.dtype
    )


def _rebuild_parameter(data, requires_grad, hooks):
    if not isinstance(data, PendingTensor) or not isinstance(hooks, dict) or hooks:
        raise Refused("an nn.Parameter that is not a plain tensor")
    return data  # a parameter's state-dict value is its tensor


# The only callables a pickle may reach: REDUCE refuses anything else.
_ALLOWED_CALLS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


def _find_global(module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_CALLS:
        return _ALLOWED_CALLS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
        return _DType(_TORCH_DTYPES[name])
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return _StorageType(np.uint8, untyped=True)
    raise Refused(f"it pickles {module}.{name}")


def _opname(code: int) -> str:
    info = pickletools.code2op.get(chr(code))
    return info.name if info is not None else f"byte 0x{code:02x}"


class Unpickler:
    """A pickle virtual machine restricted to what a tensor state dict needs."""

    def __init__(self, file: BinaryIO, end: int, persistent_load):
        self._file = file
        self._end = end  # file size: no read may claim more bytes than are left
        self._persistent_load = persistent_load
        self._stack: list = []
        self._marks: list[list] = []
        self._memo: dict[int, Any] = {}

    def _read(self, n: int) -> bytes:
        if n < 0 or n > self._end - self._file.tell():
            raise Corrupt("the file ends in the middle of a pickle")
        data = self._file.read(n)
        if len(data) != n:
            raise Corrupt("the file ends in the middle of a pickle")
        return data

    def _unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _readline(self) -> str:
        line = self._file.readline()
        if not line.endswith(b"\n"):
            raise Corrupt("the file ends in the middle of a pickle")
        return line[:-1].decode("utf-8")

    def _pop_mark(self) -> list:
        if not self._marks:
            raise Corrupt("the pickle pops a mark it never pushed")
        items, self._stack = self._stack, self._marks.pop()
        return items

    def _pop(self) -> Any:
        if not self._stack:
            raise Corrupt("the pickle pops an empty stack")
        return self._stack.pop()

    def _top(self, kind: type) -> Any:
        if not self._stack or not isinstance(self._stack[-1], kind):
            raise Corrupt(f"the pickle adds items to something that is not a {kind.__name__}")
        return self._stack[-1]

    def _setitems(self, items: list) -> None:
        target = self._top(dict)
        if len(items) % 2:
            raise Corrupt("the pickle sets a dict item without a value")
        for key, value in zip(items[::2], items[1::2]):
            target[key] = value

    def _call(self, func: Any, args: Any) -> Any:
        if not any(func is allowed for allowed in _ALLOWED_CALLS.values()):
            raise Refused("it calls something other than the tensor rebuild functions")
        if not isinstance(args, tuple):
            raise Corrupt("the pickle calls a function with arguments that are not a tuple")
        try:
            return func(*args)
        except (TypeError, ValueError) as e:  # e.g. a wrong argument count
            raise Corrupt(f"bad arguments to {getattr(func, '__name__', func)} ({e})") from e

    def _build(self) -> None:
        state = self._pop()
        target = self._stack[-1] if self._stack else None
        # state_dict() pickles its OrderedDict with `_metadata` (module versions) as state.
        if not isinstance(target, OrderedDict) or not isinstance(state, dict):
            raise Refused("it sets the state of an object (BUILD)")

    def load(self) -> Any:
        """Runs the pickle up to its STOP opcode and returns the object."""
        try:
            return self._run()
        except TypeError as e:  # e.g. an unhashable dict key or set item
            raise Corrupt(f"invalid pickle ({e})") from e

    def _run(self) -> Any:
        stack_ops = {
            0x29: lambda: (),  # EMPTY_TUPLE
            0x7D: dict,  # EMPTY_DICT
            0x5D: list,  # EMPTY_LIST
            0x8F: set,  # EMPTY_SET
            0x4E: lambda: None,  # NONE
            0x88: lambda: True,  # NEWTRUE
            0x89: lambda: False,  # NEWFALSE
            0x4B: lambda: self._unpack("<B"),  # BININT1
            0x4D: lambda: self._unpack("<H"),  # BININT2
            0x4A: lambda: self._unpack("<i"),  # BININT
            0x47: lambda: self._unpack(">d"),  # BINFLOAT
            0x8A: lambda: int.from_bytes(self._read(self._unpack("<B")), "little", signed=True),
            0x8B: lambda: int.from_bytes(self._read(self._unpack("<i")), "little", signed=True),
            0x58: lambda: self._read(self._unpack("<I")).decode("utf-8", "surrogatepass"),
            0x8C: lambda: self._read(self._unpack("<B")).decode("utf-8", "surrogatepass"),
            0x8D: lambda: self._read(self._unpack("<Q")).decode("utf-8", "surrogatepass"),
            0x54: lambda: self._read(self._unpack("<i")).decode("utf-8"),  # BINSTRING (py2)
            0x55: lambda: self._read(self._unpack("<B")).decode("utf-8"),  # SHORT_BINSTRING
            0x42: lambda: self._read(self._unpack("<I")),  # BINBYTES
            0x43: lambda: self._read(self._unpack("<B")),  # SHORT_BINBYTES
            0x8E: lambda: self._read(self._unpack("<Q")),  # BINBYTES8
            0x63: lambda: _find_global(self._readline(), self._readline()),  # GLOBAL
            0x68: lambda: self._get(self._unpack("<B")),  # BINGET
            0x6A: lambda: self._get(self._unpack("<I")),  # LONG_BINGET
            0x32: lambda: self._top(object),  # DUP
            0x74: lambda: tuple(self._pop_mark()),  # TUPLE
            0x6C: self._pop_mark,  # LIST
            0x91: lambda: frozenset(self._pop_mark()),  # FROZENSET
            0x51: lambda: self._persistent_load(self._pop()),  # BINPERSID
        }
        effect_ops = {
            0x95: lambda: self._unpack("<Q"),  # FRAME: a length hint only
            0x30: self._pop,  # POP
            0x31: self._pop_mark,  # POP_MARK
            0x75: lambda: self._setitems(self._pop_mark()),  # SETITEMS
            0x62: self._build,  # BUILD
        }
        while True:
            code = self._read(1)[0]
            if code in stack_ops:
                value = stack_ops[code]()  # first: popping a mark replaces self._stack
                self._stack.append(value)
            elif code in effect_ops:
                effect_ops[code]()
            elif code == 0x80:  # PROTO
                if self._unpack("<B") > _MAX_PICKLE_PROTOCOL:
                    raise Corrupt("unknown pickle protocol")
            elif code == 0x2E:  # STOP
                return self._pop()
            elif code == 0x28:  # MARK
                self._marks.append(self._stack)
                self._stack = []
            elif code in (0x71, 0x72):  # BINPUT, LONG_BINPUT
                self._memo[self._unpack("<B" if code == 0x71 else "<I")] = self._top(object)
            elif code == 0x94:  # MEMOIZE
                self._memo[len(self._memo)] = self._top(object)
            elif code in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                n = code - 0x84
                if len(self._stack) < n:
                    raise Corrupt("the pickle builds a tuple from an empty stack")
                items = self._stack[-n:]
                del self._stack[-n:]
                self._stack.append(tuple(items))
            elif code == 0x64:  # DICT
                items = self._pop_mark()
                self._stack.append({})
                self._setitems(items)
            elif code == 0x61:  # APPEND
                value = self._pop()
                self._top(list).append(value)
            elif code == 0x65:  # APPENDS
                items = self._pop_mark()
                self._top(list).extend(items)
            elif code == 0x90:  # ADDITEMS
                items = self._pop_mark()
                self._top(set).update(items)
            elif code == 0x73:  # SETITEM
                value, key = self._pop(), self._pop()
                self._setitems([key, value])
            elif code == 0x93:  # STACK_GLOBAL
                name, module = self._pop(), self._pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise Corrupt("STACK_GLOBAL with non-string names")
                self._stack.append(_find_global(module, name))
            elif code == 0x52:  # REDUCE
                args, func = self._pop(), self._pop()
                self._stack.append(self._call(func, args))
            elif _opname(code) in _REFUSED_OPCODES:
                raise Refused(f"its pickle uses the {_opname(code)} opcode (object creation)")
            else:
                raise Corrupt(f"unsupported pickle opcode {_opname(code)}")

    def _get(self, index: int) -> Any:
        if index not in self._memo:
            raise Corrupt(f"the pickle reads memo entry {index}, which it never wrote")
        return self._memo[index]


_REFUSED_OPCODES = frozenset(
    {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BYTEARRAY8"}
)


def storage_from_pid(pid: Any, storages: dict[str, Storage], legacy: bool) -> Storage:
    """The `Storage` of a persistent id `('storage', type, key, location, numel[, view])`."""
    if not isinstance(pid, tuple) or len(pid) != (6 if legacy else 5) or pid[0] != "storage":
        raise Corrupt(f"unknown persistent id {pid!r:.80}")
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
        raise Corrupt(f"persistent id names {storage_type!r:.80}, not a storage type")
    if not isinstance(key, str) or not isinstance(location, str):
        raise Corrupt("storage key or location is not a string")
    if not isinstance(numel, int) or numel < 0:
        raise Corrupt(f"storage size {numel!r} is not an int >= 0")
    itemsize = 1 if storage_type.untyped else storage_type.dtype.itemsize
    dtype = None if storage_type.untyped else storage_type.dtype
    storage = storages.get(key)
    if storage is None:
        storage = storages[key] = Storage(key, dtype, numel, numel * itemsize)
    elif storage.nbytes != numel * itemsize:
        raise Corrupt(f"storage {key!r} is declared with two sizes")
    view = pid[5] if legacy else None
    if view is None:
        return storage
    # Legacy storage views (torch < 1.0): (view key, offset, size), in elements.
    if not isinstance(view, tuple) or len(view) != 3:
        raise Corrupt("bad storage view")
    view_key, offset, view_numel = view
    if not all(isinstance(v, int) and v >= 0 for v in (offset, view_numel)):
        raise Corrupt("bad storage view")
    if offset + view_numel > numel:
        raise Corrupt(f"storage view {view_key!r} exceeds storage {key!r}")
    sliced = Storage(str(view_key), dtype, view_numel, view_numel * itemsize)
    sliced.base, sliced.byte_offset = storage, offset * itemsize
    return sliced
