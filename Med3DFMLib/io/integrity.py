"""Check that a volume file holds all the voxel data its header promises, before SimpleITK reads it.

SimpleITK (ITK's NIfTI, NRRD and MetaImage readers) fills voxels missing from a truncated file with
zeros and says nothing, so a scan cut short by a failed copy or download would be segmented as if
it were whole. Here the few header fields that fix the data size are parsed by hand (NIfTI-1/2:
dim, bitpix, vox_offset; NRRD: sizes, type, encoding, data file; MetaImage: DimSize, ElementType,
ElementNumberOfChannels, CompressedData(Size), ElementDataFile) and the data is measured:

* uncompressed data: the file must be at least as long as header offset + dims x bytes per voxel;
* gzip / zlib / bzip2 data: the whole stream is decompressed in bounded chunks (never a second copy
  of the volume in memory), which also verifies its CRC-32 / Adler-32 checksum, and must yield the
  promised number of bytes.

Spacings the header states as zero or negative are refused here too: ITK silently replaces them
(by the absolute value, or 1 mm, or the sform), so the image it returns no longer shows the problem.

Anything this module does not recognise (another format, an unparsable header, ASCII encodings,
multi-file lists) is left to SimpleITK, whose own error then says the file cannot be read.
"""

from __future__ import annotations

import bz2
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from Med3DFMLib.errors import Med3DFMError

IN_CHUNK = 1 << 20  # compressed bytes read at a time
OUT_CHUNK = 4 << 20  # most decompressed bytes held at a time (a 1 MB chunk of zeros inflates to ~1 GB)
MAX_HEADER = 16 << 20  # a NRRD/MetaImage text header longer than this is not one
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"


def check_file_integrity(path: Path) -> None:
    """Raise Med3DFMError if `path` (NIfTI, NRRD or MetaImage) is truncated, corrupt or has a bad spacing."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz")):
            _check_nifti(path)
        elif name.endswith((".nrrd", ".nhdr")):
            _check_nrrd(path)
        elif name.endswith((".mha", ".mhd")):
            _check_metaimage(path)
    except OSError as err:
        raise Med3DFMError(f"cannot read {path.name}: {err.strerror or err}") from None


# --- streaming decompression -------------------------------------------------------------------


class _Broken(Exception):
    """The compressed stream stopped early (`why` = "ends") or is damaged ("damaged", "checksum")."""

    def __init__(self, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.why = why
        self.detail = detail


@dataclass
class _Inflated:
    size: int  # decompressed bytes produced (up to the failure, if any)
    broken: Optional[_Broken] = None


Sink = Callable[[memoryview], None]


def _decompressor(codec: str):
    # wbits 47 = zlib or gzip, detected from the stream's own header; both verify their checksum.
    return bz2.BZ2Decompressor() if codec == "bzip2" else zlib.decompressobj(47)


def _chunks(handle: BinaryIO, codec: str, limit: Optional[int]) -> Iterator[bytes]:
    """Decompressed data from `handle`'s position, in chunks of at most OUT_CHUNK bytes.

    Concatenated gzip/bzip2 members are followed, as gzip readers do; other trailing bytes are
    ignored, as niftilib and ITK ignore them. `limit` caps the compressed bytes read.
    """
    budget = limit

    def read() -> bytes:
        nonlocal budget
        size = IN_CHUNK if budget is None else min(IN_CHUNK, budget)
        data = handle.read(size) if size > 0 else b""
        if budget is not None:
            budget -= len(data)
        return data

    magic = BZIP2_MAGIC if codec == "bzip2" else GZIP_MAGIC
    decomp = _decompressor(codec)
    data = read()
    while True:
        if not data:
            if codec != "bzip2" and not decomp.eof:
                try:
                    tail = decomp.flush()
                except zlib.error as err:
                    raise _Broken("damaged", str(err)) from None
                if tail:
                    yield tail
            if not decomp.eof:
                raise _Broken("ends")
            return
        try:
            if codec == "bzip2":
                yield decomp.decompress(data, OUT_CHUNK)
                data = b""
                while not decomp.eof and not decomp.needs_input:
                    yield decomp.decompress(b"", OUT_CHUNK)
            else:
                yield decomp.decompress(data, OUT_CHUNK)
                data = decomp.unconsumed_tail
        except (zlib.error, OSError, EOFError) as err:
            message = str(err)
            raise _Broken("checksum" if "check" in message and "header" not in message else "damaged", message) from None
        if decomp.eof:
            rest = decomp.unused_data + data
            while len(rest) < len(magic):
                more = read()
                if not more:
                    break
                rest += more
            if not rest.startswith(magic):
                return
            decomp, data = _decompressor(codec), rest
        elif not data:
            data = read()


def _inflate(handle: BinaryIO, codec: str, limit: Optional[int] = None, sink: Optional[Sink] = None) -> _Inflated:
    """Count the decompressed bytes of a stream, passing each chunk to `sink` (if any) on the way."""
    result = _Inflated(0)
    try:
        for chunk in _chunks(handle, codec, limit):
            result.size += len(chunk)
            if sink is not None:
                sink(memoryview(chunk))
    except _Broken as broken:
        result.broken = broken
    return result


def _read_raw(handle: BinaryIO, sink: Sink) -> None:
    """Pass an uncompressed file's bytes from `handle`'s position to `sink`, chunk by chunk."""
    while True:
        chunk = handle.read(OUT_CHUNK)
        if not chunk:
            return
        sink(memoryview(chunk))


class NonFiniteCounter:
    """Counts NaN and Inf float voxels in a byte stream, one chunk at a time.

    Needed for NIfTI because niftilib (inside ITK) silently turns NaN and Inf into 0 when reading,
    so the image SimpleITK returns no longer shows them.
    """

    def __init__(self, dtype: np.dtype, skip: int, nbytes: int) -> None:
        self.dtype = dtype
        self.skip = skip  # bytes before the voxels (header, extensions)
        self.left = nbytes  # voxel bytes still to come
        self.carry = b""  # the start of a voxel split across two chunks
        self.nan = 0
        self.inf = 0

    def __call__(self, chunk: memoryview) -> None:
        if self.skip:
            drop = min(self.skip, len(chunk))
            chunk, self.skip = chunk[drop:], self.skip - drop
        chunk = chunk[: max(self.left, 0)]
        self.left -= len(chunk)
        item = self.dtype.itemsize
        if self.carry:
            need = item - len(self.carry)
            self.carry += bytes(chunk[:need])
            chunk = chunk[need:]
            if len(self.carry) == item:
                self._count(np.frombuffer(self.carry, self.dtype))
                self.carry = b""
        usable = len(chunk) - len(chunk) % item
        self.carry += bytes(chunk[usable:])
        if usable:
            self._count(np.frombuffer(chunk[:usable], self.dtype))

    def _count(self, values: np.ndarray) -> None:
        if np.isfinite(values.min()) and np.isfinite(values.max()):  # NaN propagates through min/max
            return
        self.nan += int(np.count_nonzero(np.isnan(values)))
        self.inf += int(np.count_nonzero(np.isinf(values)))


def non_finite_message(name: str, nan: int, inf: int) -> Optional[str]:
    """The message for a volume with NaN or infinite voxels, or None if it has none."""
    if not (nan or inf):
        return None
    found = " and ".join(part for part in (f"{nan} NaN (not-a-number)" if nan else "", f"{inf} infinite" if inf else "") if part)
    return f"{name} holds {found} voxel{'s' if nan + inf > 1 else ''}; the file is corrupt or was written by a failed computation"


# --- messages ------------------------------------------------------------------------------------


def human_size(count: float) -> str:
    """Bytes as the user thinks of them: 1.2 MB, 312.0 kB, 17 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} bytes"


def _stream_problem(label: str, inflated: _Inflated, offset: int, promised: Optional[int]) -> Optional[str]:
    """The message for a compressed stream that is broken or too short, or None when it is whole."""
    have = max(inflated.size - offset, 0)
    of = f" of the {human_size(promised)} its header promises" if promised is not None else ""
    broken = inflated.broken
    if broken is not None and broken.why == "ends":
        return f"{label} is truncated or corrupt: its compressed data ends after {human_size(have)}{of}"
    if broken is not None and broken.why == "checksum":
        return f"{label} is truncated or corrupt: its compressed data fails its checksum (CRC), so it was damaged after it was written"
    if broken is not None:
        return f"{label} is truncated or corrupt: its compressed data is damaged ({broken.detail})"
    if promised is not None and have < promised:
        return f"{label} is truncated or corrupt: its compressed data holds only {human_size(have)}{of}"
    return None


def _raw_problem(label: str, have: int, promised: int) -> Optional[str]:
    if have < promised:
        return f"{label} is truncated: its voxel data ends after {human_size(max(have, 0))} of the {human_size(promised)} its header promises"
    return None


def _check_spacing(label: str, spacing: Sequence[float]) -> None:
    """Refuse spacings written as zero, negative or not-a-number (ITK would silently replace them)."""
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise Med3DFMError(f"{label} has an impossible voxel spacing in its header: {shown} mm (every axis must be above 0)")


def _data_label(header: Path, data: Path) -> str:
    return header.name if data == header else f"{data.name} (the data file of {header.name})"


def _existing_data_file(header: Path, data: Path) -> Path:
    if not data.is_file():
        raise Med3DFMError(f"{header.name} keeps its voxels in {data.name}, which is not found next to it")
    return data


def _product(values: Sequence[int]) -> int:
    total = 1
    for value in values:
        total *= value
    return total


# --- NIfTI ---------------------------------------------------------------------------------------


@dataclass
class _Nifti:
    header_size: int  # 348 (NIfTI-1 / Analyze) or 540 (NIfTI-2)
    data_bytes: int
    vox_offset: int
    single_file: bool  # n+1 / n+2: voxels in the same file, after the header
    spacing: List[float]
    float_dtype: Optional[np.dtype]  # float32/float64 voxels (NaN/Inf possible), else None

    def counter(self, skip: int) -> Optional[NonFiniteCounter]:
        return NonFiniteCounter(self.float_dtype, skip, self.data_bytes) if self.float_dtype is not None else None


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # datatype codes FLOAT32, FLOAT64


def _parse_nifti(head: bytes, pair: bool = False) -> Optional[_Nifti]:
    """The size fields of a NIfTI-1/2 (or Analyze 7.5) header, or None if `head` is not one.

    `pair`: the header is a .hdr whose voxels are in the .img beside it (unless its magic says n+1).
    """
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", head[70:74])
            pixdim = struct.unpack(endian + "8f", head[76:108])
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            magic, size = head[344:348], 348
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "hh", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            vox_offset = struct.unpack(endian + "q", head[168:176])[0]
            magic, size = head[4:8], 540
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or any(d < 1 for d in dims[1 : rank + 1]) or bitpix <= 0 or bitpix % 8 or not math.isfinite(vox_offset):
        return None
    single = magic[:3] in (b"n+1", b"n+2") or not pair
    offset = max(int(vox_offset), size) if single else max(int(vox_offset), 0)
    code = _NIFTI_FLOATS.get(datatype)
    dtype = np.dtype(endian + code) if code and np.dtype(code).itemsize * 8 == bitpix else None
    return _Nifti(size, _product(dims[1 : rank + 1]) * bitpix // 8, offset, single, list(pixdim[1 : min(rank, 3) + 1]), dtype)


class _NiftiStream:
    """Sink for a .nii.gz stream: keeps the header's bytes, then counts NaN/Inf in the voxels."""

    HEAD = 540  # enough for either header version

    def __init__(self, pair: bool) -> None:
        self.pair = pair
        self.head = bytearray()
        self.decided = False
        self.info: Optional[_Nifti] = None
        self.counter: Optional[NonFiniteCounter] = None

    def __call__(self, chunk: memoryview) -> None:
        if not self.decided:
            take = self.HEAD - len(self.head)
            self.head += chunk[:take]
            chunk = chunk[take:]
            if len(self.head) < self.HEAD:
                return
            self.finish()
        if self.counter is not None and len(chunk):
            self.counter(chunk)

    def finish(self) -> None:
        """Parse the header once enough of the stream has arrived (or the stream has ended)."""
        if self.decided:
            return
        self.decided = True
        self.info = _parse_nifti(bytes(self.head), self.pair)
        if self.info is not None and self.info.single_file:
            self.counter = self.info.counter(self.info.vox_offset)
            if self.counter is not None:
                self.counter(memoryview(bytes(self.head)))


def _nifti_pair_data(header: Path) -> Path:
    """The .img (or .img.gz) beside a .hdr header."""
    name = header.name
    stem = name[: -len(".hdr.gz")] if name.lower().endswith(".hdr.gz") else name[: -len(".hdr")]
    for suffix in (".img", ".img.gz", ".IMG", ".IMG.GZ"):
        candidate = header.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return header.with_name(stem + ".img")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _check_nifti(path: Path) -> None:
    pair = path.name.lower().endswith((".hdr", ".hdr.gz"))
    counter: Optional[NonFiniteCounter] = None
    if _is_gzip(path):
        stream = _NiftiStream(pair)
        with open(path, "rb") as handle:
            inflated = _inflate(handle, "gzip", sink=stream)
        stream.finish()
        info, counter = stream.info, stream.counter
        if info is None and inflated.broken is None:
            return  # not a NIfTI header: SimpleITK says what it is not
        if info is not None:
            _check_spacing(path.name, info.spacing)
            if not info.single_file:
                return _check_nifti_pair_data(path, info)
        promised = info.data_bytes if info is not None else None
        problem = _stream_problem(path.name, inflated, info.vox_offset if info is not None else 0, promised)
    else:
        with open(path, "rb") as handle:
            info = _parse_nifti(handle.read(540), pair)
            if info is None:
                return
            _check_spacing(path.name, info.spacing)
            if not info.single_file:
                return _check_nifti_pair_data(path, info)
            problem = _raw_problem(path.name, path.stat().st_size - info.vox_offset, info.data_bytes)
            counter = info.counter(0)
            if problem is None and counter is not None:
                handle.seek(info.vox_offset)
                _read_raw(handle, counter)
    problem = problem or (non_finite_message(path.name, counter.nan, counter.inf) if counter is not None else None)
    if problem:
        raise Med3DFMError(problem)


def _check_nifti_pair_data(header: Path, info: _Nifti) -> None:
    data = _existing_data_file(header, _nifti_pair_data(header))
    label = _data_label(header, data)
    counter = info.counter(info.vox_offset)
    with open(data, "rb") as handle:
        if _is_gzip(data):
            problem = _stream_problem(label, _inflate(handle, "gzip", sink=counter), info.vox_offset, info.data_bytes)
        else:
            problem = _raw_problem(label, data.stat().st_size - info.vox_offset, info.data_bytes)
            if problem is None and counter is not None:
                _read_raw(handle, counter)
    problem = problem or (non_finite_message(label, counter.nan, counter.inf) if counter is not None else None)
    if problem:
        raise Med3DFMError(problem)


# --- NRRD ----------------------------------------------------------------------------------------

_NRRD_TYPE_BYTES: Dict[str, int] = {}
for _size, _names in {
    1: "signed char, int8, int8_t, uchar, unsigned char, uint8, uint8_t",
    2: "short, short int, signed short, signed short int, int16, int16_t, ushort, unsigned short, unsigned short int, uint16, uint16_t",
    4: "int, signed int, int32, int32_t, uint, unsigned int, uint32, uint32_t, float",
    8: "longlong, long long, long long int, signed long long, signed long long int, int64, int64_t, "
    "ulonglong, unsigned long long, unsigned long long int, uint64, uint64_t, double",
}.items():
    _NRRD_TYPE_BYTES.update({n.strip(): _size for n in _names.split(",")})
_NRRD_CODECS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}


def _read_text_header(handle: BinaryIO, last_key: Optional[str] = None) -> Tuple[List[str], bool]:
    """Header lines up to a blank line (NRRD) or up to the `last_key` line (MetaImage), then stops.

    Returns (lines, complete); `handle` is left at the first data byte.
    """
    lines: List[str] = []
    read = 0
    while read < MAX_HEADER:
        raw = handle.readline(MAX_HEADER)
        if not raw:
            return lines, last_key is None  # a detached .nhdr may end without a blank line
        read += len(raw)
        line = raw.decode("latin-1").rstrip("\r\n")
        if last_key is None and not line.strip():
            return lines, True
        lines.append(line)
        if last_key is not None and line.split("=", 1)[0].strip().lower() == last_key:
            return lines, True
    return lines, False


def _nrrd_fields(lines: Sequence[str]) -> Dict[str, str]:
    fields: Dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        field, colon, value = line.partition(": ")
        if not colon or ":=" in field:
            continue  # a key:=value pair, not a field
        fields[field.strip().lower().replace(" ", "")] = value.strip()
    return fields


def _nrrd_spacing(fields: Dict[str, str]) -> List[float]:
    """Spacings stated by `spacings` or the lengths of the `space directions` vectors."""
    spacing: List[float] = []
    if "spacings" in fields:
        for value in fields["spacings"].split():
            number = float(value)
            if not math.isnan(number):  # nan marks a non-spatial axis
                spacing.append(number)
    if "spacedirections" in fields:
        for vector in re.findall(r"\(([^)]*)\)", fields["spacedirections"]):  # "none" axes have no vector
            components = [float(v) for v in vector.split(",")]
            spacing.append(math.sqrt(sum(c * c for c in components)) if all(map(math.isfinite, components)) else math.nan)
    return spacing


def _check_nrrd(path: Path) -> None:
    with open(path, "rb") as handle:
        if not handle.read(7) == b"NRRD000":
            return
        handle.seek(0)
        lines, complete = _read_text_header(handle)
        data_offset = handle.tell()
    fields = _nrrd_fields(lines)
    try:
        dimension = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
        kind = fields["type"].lower()
        element = int(fields["blocksize"]) if kind == "block" else _NRRD_TYPE_BYTES[kind]
        codec = _NRRD_CODECS[fields["encoding"].lower()]  # ascii/text/hex: no size to check cheaply
        line_skip = int(fields.get("lineskip", "0"))
        byte_skip = int(fields.get("byteskip", "0"))
        spacing = _nrrd_spacing(fields)
    except (KeyError, ValueError):
        return
    if not complete or len(sizes) != dimension or any(s < 1 for s in sizes):
        return
    _check_spacing(path.name, spacing)
    data_file = fields.get("datafile")
    if data_file is not None:
        if data_file.startswith("LIST") or len(data_file.split()) > 1:
            return  # a list or a numbered pattern of files: SimpleITK reads and checks those
        data = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
        data = _existing_data_file(path, data)
        data_offset = 0
    else:
        data = path
    promised = _product(sizes) * element
    label = _data_label(path, data)
    with open(data, "rb") as handle:
        handle.seek(data_offset)
        for _ in range(line_skip):
            handle.readline()
        if codec == "raw":
            available = data.stat().st_size - handle.tell()
            problem = _raw_problem(label, available if byte_skip == -1 else available - byte_skip, promised)
        else:
            problem = _stream_problem(label, _inflate(handle, codec), max(byte_skip, 0), promised)
    if problem:
        raise Med3DFMError(problem)


# --- MetaImage -----------------------------------------------------------------------------------

_MET_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def _check_metaimage(path: Path) -> None:
    with open(path, "rb") as handle:
        lines, complete = _read_text_header(handle, last_key="elementdatafile")
        data_offset = handle.tell()
    if not complete:
        return
    fields = {}
    for line in lines:
        key, equals, value = line.partition("=")
        if equals:
            fields[key.strip().lower()] = value.strip()
    try:
        rank = int(fields["ndims"])
        sizes = [int(s) for s in fields["dimsize"].split()]
        element = _MET_TYPE_BYTES[fields["elementtype"].upper()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        compressed = fields.get("compresseddata", "false").lower() == "true"
        compressed_size = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
        header_size = int(fields.get("headersize", "0"))
        spacing = [float(s) for s in fields["elementspacing"].split()] if "elementspacing" in fields else []
        data_file = fields["elementdatafile"]
    except (KeyError, ValueError):
        return
    if len(sizes) != rank or any(s < 1 for s in sizes) or channels < 1 or fields.get("binarydata", "true").lower() != "true":
        return
    _check_spacing(path.name, spacing)
    if data_file.upper() == "LOCAL":
        data = path
    elif data_file.upper().startswith("LIST") or len(data_file.split()) > 1:
        return  # one file per slice: SimpleITK reads and checks those
    else:
        data = _existing_data_file(path, Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file)
        data_offset = 0
    promised = _product(sizes) * element * channels
    label = _data_label(path, data)
    with open(data, "rb") as handle:
        if compressed:
            handle.seek(data_offset)
            problem = _stream_problem(label, _inflate(handle, "zlib", limit=compressed_size or None), 0, promised)
        else:
            available = data.stat().st_size - data_offset
            problem = _raw_problem(label, available if header_size == -1 else available - max(header_size, 0), promised)
    if problem:
        raise Med3DFMError(problem)
