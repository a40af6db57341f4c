"""An ``.npz`` file's arrays, each read once: a member stored uncompressed (``np.savez``) is memory-mapped
(copy-on-write, after its CRC is checked in chunks), a compressed one (``np.savez_compressed``) is read
into memory once. Samples are then views of these arrays, never copies, so loading N samples costs one
pass over the file and memory bounded by the file (for a memory-mapped member, pages the kernel can drop).

Arrays of the same file and member are shared while anything holds them: a second reader of an unchanged
file (calibration and evaluation from one file, ``compare`` fingerprinting the data) gets the same array.
A memory-mapped file must not be rewritten in place while it is in use (write a new file and rename it).
"""

from __future__ import annotations

import struct
import weakref
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

CHUNK_BYTES = 1 << 20
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes before the name and extra field
# the arrays read so far, while something holds them: the object a view's ``base`` is (what keeps the data
# alive) and, held apart, where in it the member's array lies
_shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_layout: dict[tuple, tuple] = {}
# members read or mapped, by (how, member name), not counting those served from the shared arrays
reads: Counter = Counter()


class MemberError(Exception):
    """A member that cannot be read; ``kind`` is 'corrupt' or 'pickle'."""

    def __init__(self, kind: str, message: str, member: str = ""):
        super().__init__(message)
        self.kind, self.member = kind, member


def read_members(path: Path, wanted: Callable[[list[str]], list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The names of the arrays in ``path`` and, read once each, those of ``wanted(names)`` it holds.
    Raises what ``np.load`` raises for a file that is not an npz, :class:`MemberError` for a bad member."""
    path = Path(path)
    archive = np.load(path, allow_pickle=False)  # validates the zip's central directory
    if not hasattr(archive, "files"):  # a plain .npy under an .npz name
        raise ValueError("not an npz archive (a single array, not a zip of arrays)")
    with archive:
        keys, names = list(archive.files), set(archive.zip.namelist())
        stat = path.stat()
        out: dict[str, np.ndarray] = {}
        for k in wanted(keys):
            if k not in keys or k in out:
                continue
            info = archive.zip.getinfo(k + ".npy" if k + ".npy" in names else k)
            key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, k, info.CRC, info.file_size)
            arr = _shared_array(key)
            if arr is None:
                try:
                    arr = _mapped(path, info, k) if info.compress_type == zipfile.ZIP_STORED else None
                    reads["mapped" if arr is not None else "read", k] += 1
                    if arr is None:
                        arr = _read(archive, k)
                except MemberError as e:
                    e.member = k
                    raise
                _share(key, arr)
            out[k] = arr
    return keys, out


def _share(key: tuple, arr: np.ndarray) -> None:
    root = arr[...].base  # what every view of ``arr`` keeps alive (numpy collapses chains of views)
    if not isinstance(root, np.ndarray) or root.dtype != arr.dtype:
        return
    offset = arr.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    for old in [k for k in _layout if k not in _shared]:
        del _layout[old]  # arrays nothing holds any more
    _shared[key], _layout[key] = root, (arr.shape, arr.strides, offset)


def _shared_array(key: tuple) -> np.ndarray | None:
    root, layout = _shared.get(key), _layout.get(key)
    if root is None or layout is None:
        return None
    shape, strides, offset = layout
    return np.ndarray(shape, root.dtype, buffer=root, offset=offset, strides=strides)


def _read(archive, k: str) -> np.ndarray:
    try:
        return archive[k]
    except Exception as e:  # BadZipFile (CRC), EOFError, zlib.error, ValueError
        if isinstance(e, ValueError) and "allow_pickle" in str(e):
            raise MemberError("pickle", str(e)) from e
        raise MemberError("corrupt", str(e)) from e


def _mapped(path: Path, info: zipfile.ZipInfo, k: str) -> np.ndarray | None:
    """A stored member as a copy-on-write memory map, its CRC checked; None where it cannot be mapped
    (encrypted, an npy format other than 1.0/2.0, object or empty arrays): the caller reads it instead."""
    if info.flag_bits & 0x1:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            raise MemberError("corrupt", f"bad local header for file '{info.filename}'")
        name_len, extra_len = _LOCAL_HEADER.unpack(head)[-2:]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        end = start + info.compress_size
        if path.stat().st_size < end:
            raise MemberError("corrupt", f"'{info.filename}' ends past the end of the file (truncated)")
        crc, pos, buf = 0, start, memoryview(bytearray(CHUNK_BYTES))
        f.seek(start)
        while pos < end:
            got = f.readinto(buf[: min(CHUNK_BYTES, end - pos)])
            if not got:
                raise MemberError("corrupt", f"'{info.filename}' ends early (truncated)")
            crc, pos = zlib.crc32(buf[:got], crc), pos + got
        if crc != info.CRC:
            raise MemberError("corrupt", f"Bad CRC-32 for file '{info.filename}'")
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        except ValueError as e:
            raise MemberError("corrupt", f"array '{k}': {e}") from e
        offset = f.tell()
    if dtype.hasobject or dtype.itemsize == 0:
        return None  # read by numpy, which refuses pickled objects with its own message
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes != end:
        raise MemberError("corrupt", f"array '{k}': its header says {nbytes} bytes, the member holds {end - offset}")
    if nbytes == 0:
        return None
    mm = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape, order="F" if fortran else "C")
    return np.asarray(mm)  # a plain ndarray view (slices of an np.memmap would be np.memmap too)
