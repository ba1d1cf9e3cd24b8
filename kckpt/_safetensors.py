"""The safetensors file format, read and written here: arrays by name, with string metadata.

A file is an 8-byte little-endian header length N, a JSON header of N bytes
(``{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
..., "__metadata__": {"key": "value"}}``, padded with spaces), then the
arrays' raw little-endian bytes, back to back, at those offsets from the end
of the header (https://huggingface.co/docs/safetensors, the format's spec).

kckpt writes the format itself because the `safetensors` library takes the
whole tree in memory (`save_file`), where `FileWriter` writes the header from
the shapes alone and then one array at a time; and it reads it itself
because the library's NumPy API cannot give bfloat16 arrays (NumPy has no
bfloat16 of its own: ``load_file`` fails with "data type 'bfloat16' not
understood"), where `FileReader` returns `ml_dtypes` arrays, as JAX uses.

>>> import numpy as np
>>> header = header_bytes({"w": (np.dtype("float32"), (2,))}, {"step": "3"})
>>> len(header) % 8, header[8:9]
(0, b'{')
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from typing import IO, Any

import jax.numpy as jnp
import numpy as np

# The format's dtype codes -> NumPy dtype names (the ML ones from ml_dtypes, as JAX names them).
DTYPE_NAMES = {
  "BOOL": "bool",
  "U8": "uint8",
  "I8": "int8",
  "U16": "uint16",
  "I16": "int16",
  "F16": "float16",
  "BF16": "bfloat16",
  "U32": "uint32",
  "I32": "int32",
  "F32": "float32",
  "U64": "uint64",
  "I64": "int64",
  "F64": "float64",
  "C64": "complex64",
  "F8_E4M3": "float8_e4m3fn",
  "F8_E5M2": "float8_e5m2",
}
_CODES = {name: code for code, name in DTYPE_NAMES.items()}
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100 * 2**20  # the limit readers apply (the spec's, against untrusted files)


def dtype_code(dtype: np.dtype) -> str | None:
  """The format's code for `dtype` (``"BF16"``), or None when the format has none (complex128, int4...).

  >>> dtype_code(jnp.dtype("bfloat16")), dtype_code(np.dtype("complex128"))
  ('BF16', None)
  """
  return _CODES.get(np.dtype(dtype).name)


def numpy_dtype(code: str) -> np.dtype:
  """The NumPy dtype of a format code; ValueError for an unknown code."""
  if code not in DTYPE_NAMES:
    raise ValueError(f"unknown safetensors dtype {code!r} (known: {', '.join(DTYPE_NAMES)})")
  return jnp.dtype(DTYPE_NAMES[code])


def _nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def header_bytes(tensors: Mapping[str, tuple[np.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
  """The length and JSON header of a file holding `tensors` (name -> dtype, shape), in that order.

  The arrays' bytes follow in the same order. The header is padded with
  spaces so that the data starts at a multiple of 8 bytes, as the library's
  writer does.
  """
  header: dict[str, Any] = {}
  if metadata:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
      raise ValueError(f"safetensors metadata holds strings only: {bad}")
    header[METADATA_KEY] = dict(metadata)
  offset = 0
  for name, (dtype, shape) in tensors.items():
    code = dtype_code(dtype)
    if code is None:
      raise ValueError(f"{name}: the safetensors format has no dtype {np.dtype(dtype).name}")
    if name == METADATA_KEY:
      raise ValueError(f"{name!r} is the format's metadata entry, not a tensor name")
    end = offset + _nbytes(dtype, shape)
    header[name] = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [offset, end]}
    offset = end
  text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
  text += b" " * (-(8 + len(text)) % 8)
  return struct.pack("<Q", len(text)) + text


class FileWriter:
  """Writes a safetensors file to an open binary file, one array at a time.

  The header is written first, from the names, dtypes and shapes; then
  `write` takes the arrays in that order, each checked against the header.
  """

  def __init__(self, f: IO[Any], tensors: Mapping[str, tuple[np.dtype, tuple[int, ...]]], metadata: Mapping[str, str]):
    self._f = f
    self._expected = [(name, np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in tensors.items()]
    self._next = 0
    f.write(header_bytes(tensors, metadata))

  def write(self, name: str, array: Any) -> None:
    """Writes the next array; ValueError when it is not the header's next one, or differs from it."""
    if self._next >= len(self._expected):
      raise ValueError(f"{name}: all {len(self._expected)} arrays of the header are written already")
    want_name, dtype, shape = self._expected[self._next]
    array = np.asarray(array)
    if name != want_name or array.dtype != dtype or array.shape != shape:
      raise ValueError(f"{name}: got {array.shape} {array.dtype} where the header has {want_name}: {shape} {dtype}")
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    self._f.write(array.reshape(-1).view(np.uint8).data)
    self._next += 1

  def close(self) -> None:
    """Checks that every array of the header was written."""
    if self._next != len(self._expected):
      missing = [name for name, _, _ in self._expected[self._next :]]
      raise ValueError(f"{len(missing)} arrays of the header were not written: {missing[:5]}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One array of a file, from its header."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # byte offsets from the start of the data
  end: int


class FileReader:
  """Reads arrays by name from an open safetensors file (only those asked for).

  Attributes:
    tensors: name -> `TensorInfo`, in the header's order.
    metadata: the header's ``__metadata__`` (string -> string).
  """

  def __init__(self, f: IO[Any], *, where: str = "the file"):
    self._f = f
    self._where = where
    first = f.read(8)
    if len(first) != 8:
      raise ValueError(f"{where} is not a safetensors file: {len(first)} bytes")
    (size,) = struct.unpack("<Q", first)
    if size > MAX_HEADER_BYTES:
      raise ValueError(f"{where} is not a safetensors file: header of {size} bytes (more than {MAX_HEADER_BYTES})")
    try:
      header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{where} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
      raise ValueError(f"{where} is not a safetensors file: its header is not a JSON object")
    self._data_start = 8 + size
    metadata = header.pop(METADATA_KEY, None) or {}
    self.metadata: dict[str, str] = {str(k): str(v) for k, v in metadata.items()}
    self.tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
      try:
        dtype = numpy_dtype(entry["dtype"])
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: tensor {name!r} has a bad header entry {entry!r} ({e})") from None
      if end - begin != _nbytes(dtype, shape):
        raise ValueError(f"{where}: tensor {name!r} is {shape} {dtype} but spans {end - begin} bytes")
      self.tensors[name] = TensorInfo(name, dtype, shape, begin, end)

  def read(self, name: str) -> np.ndarray:
    """The array `name`, as a new NumPy array in native byte order."""
    info = self.tensors[name]
    self._f.seek(self._data_start + info.begin)
    data = self._f.read(info.end - info.begin)
    if len(data) != info.end - info.begin:
      raise ValueError(f"{self._where}: tensor {name!r} is cut short ({len(data)} of {info.end - info.begin} bytes)")
    little = np.frombuffer(data, dtype=info.dtype.newbyteorder("<")).reshape(info.shape)
    return little.astype(info.dtype)  # a copy, native order, writable
