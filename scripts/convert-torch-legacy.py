#!/usr/bin/env python3
"""Converts a *legacy* (non-zip) PyTorch checkpoint into safetensors, without torch.

Why Python and not Rust: this is an offline, one-shot build step that runs where
the project's venv already exists; Python's own `pickle` module parses the
format exactly, and a restricted `Unpickler.find_class` (an allow-list of the
few globals a state_dict needs) means the checkpoint cannot run code. Only the
standard library and numpy are used, so it works on a machine without torch.

Legacy layout (torch.save with _use_new_zipfile_serialization=False):
  1. pickle: magic number 0x1950a86a20f9469cfc6c
  2. pickle: protocol version (1001)
  3. pickle: sys info dict (endianness, type sizes)
  4. pickle: the object (here a state_dict); tensors are
     torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) and each
     storage is a persistent id ('storage', StorageType, key, location, numel).
  5. pickle: list of storage keys, in the order the storages follow
  6. per storage: u64 little-endian element count, then the raw data.

Usage: convert-torch-legacy.py IN.pth OUT.safetensors [--drop-suffix num_batches_tracked]
"""

import argparse
import collections
import json
import pickle
import struct
import sys

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001

# torch storage class name -> (numpy dtype, safetensors dtype)
STORAGE_DTYPES = {
    "FloatStorage": (np.float32, "F32"),
    "DoubleStorage": (np.float64, "F64"),
    "HalfStorage": (np.float16, "F16"),
    "LongStorage": (np.int64, "I64"),
    "IntStorage": (np.int32, "I32"),
    "ShortStorage": (np.int16, "I16"),
    "CharStorage": (np.int8, "I8"),
    "ByteStorage": (np.uint8, "U8"),
    "BoolStorage": (np.bool_, "BOOL"),
}


class StorageType:
    def __init__(self, name):
        if name not in STORAGE_DTYPES:
            raise ValueError(f"unsupported storage type torch.{name}")
        self.name = name
        self.dtype, self.st_dtype = STORAGE_DTYPES[name]


class TensorRef:
    """A tensor whose storage bytes are read after the object pickle."""

    def __init__(self, storage_key, offset, size, stride):
        self.storage_key = storage_key
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


def rebuild_tensor_v2(storage, storage_offset, size, stride, *_rest):
    return TensorRef(storage, storage_offset, size, stride)


class StateDictUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.storage_types = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid[:5]
        self.storage_types[key] = storage_type
        return key


def load_legacy(path):
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a legacy torch checkpoint (bad magic number)")
        protocol = pickle.load(f)
        if protocol != PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy protocol {protocol}")
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        unpickler = StateDictUnpickler(f)
        obj = unpickler.load()
        keys = pickle.load(f)
        storages = {}
        for key in keys:
            st = unpickler.storage_types[key]
            (count,) = struct.unpack("<Q", f.read(8))
            itemsize = np.dtype(st.dtype).itemsize
            data = f.read(count * itemsize)
            if len(data) != count * itemsize:
                raise ValueError(f"{path}: storage {key} truncated")
            storages[key] = np.frombuffer(data, dtype=st.dtype)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top-level object is {type(obj).__name__}, expected a state_dict")
    tensors = collections.OrderedDict()
    for name, ref in obj.items():
        if not isinstance(ref, TensorRef):
            continue
        st = unpickler.storage_types[ref.storage_key]
        flat = storages[ref.storage_key]
        itemsize = flat.itemsize
        arr = np.lib.stride_tricks.as_strided(
            flat[ref.offset:],
            shape=ref.size,
            strides=tuple(s * itemsize for s in ref.stride),
        )
        tensors[name] = (np.ascontiguousarray(arr), st.st_dtype)
    return tensors


def write_safetensors(path, tensors, metadata=None):
    header = {}
    offset = 0
    for name, (arr, st_dtype) in tensors.items():
        n = arr.nbytes
        header[name] = {"dtype": st_dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr, _ in tensors.values():
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--drop-suffix", action="append", default=["num_batches_tracked"],
                    help="drop tensors whose name ends with this (repeatable)")
    args = ap.parse_args()
    tensors = load_legacy(args.input)
    kept = collections.OrderedDict(
        (k, v) for k, v in tensors.items() if not any(k.endswith(s) for s in args.drop_suffix)
    )
    write_safetensors(args.output, kept, {"format": "pt", "converted_by": "tandem convert-torch-legacy"})
    print(f"wrote {len(kept)} tensors to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
