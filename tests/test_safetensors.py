"""kckpt's safetensors reader and writer against the reference library, both ways."""

import doctest
import io

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from kckpt import _safetensors

ARRAYS = {
  "dense.w": np.arange(6, dtype=np.float32).reshape(2, 3),
  "dense.b": np.array([1.5, -2.0], np.float64),
  "emb": (np.arange(8, dtype=np.float32) / 3).astype(jnp.bfloat16),
  "mask": np.array([True, False, True]),
  "count": np.array(7, np.int64),
  "empty": np.zeros((0, 4), np.int8),
  "half": np.array([0.25, 4.0], np.float16),
}


def write(arrays, metadata=None) -> bytes:
  buffer = io.BytesIO()
  writer = _safetensors.FileWriter(buffer, {n: (a.dtype, a.shape) for n, a in arrays.items()}, metadata or {})
  for name, array in arrays.items():
    writer.write(name, array)
  writer.close()
  return buffer.getvalue()


def test_files_kckpt_writes_are_what_the_library_reads(tmp_path):
  data = write(ARRAYS, {"kckpt_step": "3"})
  path = tmp_path / "m.safetensors"
  path.write_bytes(data)
  with safetensors.safe_open(str(path), framework="numpy") as f:
    assert f.metadata() == {"kckpt_step": "3"}
    assert sorted(f.keys()) == sorted(ARRAYS)
    assert f.get_slice("emb").get_dtype() == "BF16"
  # The library's NumPy API has no bfloat16: its raw bytes are read with `deserialize`.
  raw = dict(safetensors.deserialize(data))
  assert raw["emb"]["dtype"] == "BF16" and raw["emb"]["shape"] == [8]
  np.testing.assert_array_equal(np.frombuffer(bytes(raw["emb"]["data"]), jnp.bfloat16), ARRAYS["emb"])
  others = {n: a for n, a in ARRAYS.items() if n != "emb"}
  (tmp_path / "no_bf16.safetensors").write_bytes(write(others))
  loaded = safetensors.numpy.load_file(str(tmp_path / "no_bf16.safetensors"))
  assert sorted(loaded) == sorted(others)
  for name, array in others.items():
    assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
    np.testing.assert_array_equal(loaded[name], array)


def test_files_the_library_writes_are_what_kckpt_reads(tmp_path):
  path = tmp_path / "m.safetensors"
  safetensors.numpy.save_file(ARRAYS, str(path), metadata={"format": "np"})
  with open(path, "rb") as f:
    reader = _safetensors.FileReader(f)
    assert reader.metadata == {"format": "np"}
    assert {n: (t.dtype, t.shape) for n, t in reader.tensors.items()} == {n: (a.dtype, a.shape) for n, a in ARRAYS.items()}
    for name, array in ARRAYS.items():
      np.testing.assert_array_equal(reader.read(name), array)
    assert reader.read("emb").dtype == jnp.bfloat16


def test_the_writer_refuses_what_the_header_does_not_say_and_the_reader_names_a_bad_file(tmp_path):
  buffer = io.BytesIO()
  writer = _safetensors.FileWriter(buffer, {"a": (np.dtype("float32"), (2,)), "b": (np.dtype("int32"), ())}, {})
  with pytest.raises(ValueError, match=r"b: got \(2,\) float32 where the header has a"):
    writer.write("b", np.zeros(2, np.float32))
  writer.write("a", np.zeros(2, np.float32))
  with pytest.raises(ValueError, match=r"1 arrays of the header were not written: \['b'\]"):
    writer.close()
  with pytest.raises(ValueError, match="has no dtype complex128"):
    _safetensors.header_bytes({"z": (np.dtype("complex128"), (1,))}, {})
  with pytest.raises(ValueError, match="metadata holds strings only"):
    _safetensors.header_bytes({}, {"step": 3})
  with pytest.raises(ValueError, match="m.bin is not a safetensors file"):
    _safetensors.FileReader(io.BytesIO(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope"), where="m.bin")
  cut = write({"w": np.ones(4, np.float32)})[:-3]
  with pytest.raises(ValueError, match=r"tensor 'w' is cut short \(13 of 16 bytes\)"):
    _safetensors.FileReader(io.BytesIO(cut)).read("w")


def test_docstring_examples():
  failures, attempted = doctest.testmod(_safetensors)
  assert failures == 0 and attempted > 0
