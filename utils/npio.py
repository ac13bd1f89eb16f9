"""The one way this project reads NumPy files (.npy, and one array of a .npz) that a user hands it.

Nothing is unpickled: the file must start with the .npy (or zip) magic, the array header is read and checked first
(an object dtype, which only pickle can restore, is refused before any data is read; so are a wrong dtype, shape or
a file shorter than its header announces), then the data is read with allow_pickle=False. Every failure is an
ArrayFileError naming the file and what was expected, never NumPy's suggestion to load the file with pickling on.
"""
import os
import zipfile

import numpy as np

from utils.cli import UserError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
KIND_NAMES = {"f": "float", "i": "integer", "u": "unsigned integer", "b": "boolean", "U": "string", "c": "complex"}


class ArrayFileError(UserError):
    """A .npy/.npz file is refused or does not hold the expected array."""


def read_header(fp):
    """(shape, dtype, data offset) of the .npy stream `fp` positioned at its magic."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    return tuple(shape), np.dtype(dtype), fp.tell()


def describe(kinds, shape):
    kind = " or ".join(KIND_NAMES.get(k, k) for k in kinds)
    return f"a {kind} array of shape [{', '.join('*' if n is None else str(n) for n in shape)}]"


def check_header(where, expect, shape, dtype, kinds, expected_shape):
    if dtype.hasobject:
        raise ArrayFileError(f"{where}: expected {expect}, got an array of Python objects (dtype {dtype}); "
                             "refused, only unpickling could restore it")
    ok_shape = len(shape) == len(expected_shape) and all(e is None or n == e for n, e in zip(shape, expected_shape))
    if dtype.kind not in kinds or not ok_shape:
        raise ArrayFileError(f"{where}: expected {expect}, got a {dtype} array of shape {list(shape)}")


def load_array(path, expect=None, kinds="f", shape=(None,), key=None, mmap=False):
    """The array of the .npy file `path`, or the array `key` of the .npz file `path`.

    kinds: allowed dtype kinds (numpy dtype.kind letters: "f" float, "i" int, "U" str, ...); shape: the expected
    shape, None for any length on that axis (its length is the number of axes); expect: words for the error
    message (default: from kinds and shape); mmap: memory-map a .npy instead of reading it (read-only)."""
    path = os.fspath(path)
    expect = expect or describe(kinds, shape)
    where = path if key is None else f"{path}, array '{key}'"
    with open(path, "rb") as fp:  # FileNotFoundError / IsADirectoryError name the path themselves
        magic = fp.read(len(NPY_MAGIC))
    if key is None and magic != NPY_MAGIC:
        raise ArrayFileError(f"{path}: expected a NumPy .npy file holding {expect}, but it does not start with the "
                             ".npy magic (refused, nothing was unpickled)")
    if key is not None and magic[:len(ZIP_MAGIC)] != ZIP_MAGIC:
        raise ArrayFileError(f"{path}: expected a NumPy .npz file holding '{key}' ({expect}), but it is not a zip "
                             "archive (refused, nothing was unpickled)")
    try:
        if key is None:
            with open(path, "rb") as fp:
                array_shape, dtype, offset = read_header(fp)
                check_header(where, expect, array_shape, dtype, kinds, shape)
                size = os.fstat(fp.fileno()).st_size
                need = offset + int(np.prod(array_shape, dtype=np.int64)) * dtype.itemsize
                if size < need:
                    raise ArrayFileError(f"{where}: expected {expect}, but the file is truncated: {size} bytes, "
                                         f"its header announces a {dtype} array of shape {list(array_shape)} "
                                         f"({need} bytes)")
                if not mmap:
                    fp.seek(0)
                    return np.lib.format.read_array(fp, allow_pickle=False)
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with zipfile.ZipFile(path) as archive:
            names = [name[:-len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
            if key not in names:
                raise ArrayFileError(f"{path}: expected an array '{key}' ({expect}); the archive holds "
                                     f"{names or 'no arrays'}")
            with archive.open(key + ".npy") as fp:
                array_shape, dtype, _ = read_header(fp)
            check_header(where, expect, array_shape, dtype, kinds, shape)
            with archive.open(key + ".npy") as fp:
                return np.lib.format.read_array(fp, allow_pickle=False)
    except ArrayFileError:
        raise
    except Exception as error:  # a broken header, zip or data block
        message = " ".join(str(error).split())
        detail = f": {message[:200]}" if message and "pickle" not in message.lower() else ""  # no "allow_pickle" tip
        raise ArrayFileError(f"{where}: expected {expect}, but the file is truncated or corrupt "
                             f"({type(error).__name__}{detail})") from None
