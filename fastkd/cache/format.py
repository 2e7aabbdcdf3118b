"""The on-disk format of the teacher cache (``docs/cache.md``): the container, the encodings, checksums.

Container: each shard is a safetensors file (an 8-byte little-endian header length,
a JSON header naming each array's dtype, shape and byte range, then the raw arrays),
so anyone can open it with the ``safetensors`` package, or with the 20 lines of
``read_arrays`` below, without fastkd. Arrays are read through ``numpy.memmap``:
opening a shard reads its header only.

Encodings of one row (one token position) of a top-k teacher with vocabulary ``V``:

* token ids: ``uint16`` for ``V <= 2**16``; ``b = ceil(log2 V)`` bits each, packed
  big-endian into ``ceil(K b / 8)`` bytes for ``V <= 2**24``; ``uint32`` above;
* log-probs, ``"float16"``: as float16; ``"int8"``: one byte per entry,
  ``code = round((max - logprob) / step)`` in ``[0, 254]`` with the row's ``step``
  stored as float16 (255 marks a slot without mass);
* the tail, ``log(1 - sum_k p_k)`` (the mass outside the top-k), float16.

Decoding renormalises the row so the decoded top-k mass plus the stored tail sum to
one: every constant offset (the row maximum, which int8 does not store) cancels, and
the encoding error is second order in the rounding (``docs/cache.md`` gives the
measured KL). Slots without mass (padding, ``-inf`` log-probs) decode to id ``-1``,
``TopKTeacher``'s padding slot.
"""
import hashlib
import json
import math
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np

FORMAT = "fastkd-teacher-cache"
VERSION = 1
LOGPROB_ENCODINGS = ("float16", "int8")
NO_MASS_CODE = 255  # int8 code of a slot that holds no mass (padding or a -inf log-prob)
_LEVELS = NO_MASS_CODE - 1  # codes 0..254 carry values

_SAFETENSORS_DTYPES = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "I32": np.int32,
                       "I64": np.int64, "F16": np.float16, "F32": np.float32}
_DTYPE_NAMES = {np.dtype(t): name for name, t in _SAFETENSORS_DTYPES.items()}


# --- container ---------------------------------------------------------------------------------

def write_arrays(path: str, arrays: Dict[str, np.ndarray], metadata: Dict[str, str]) -> Tuple[int, str]:
    """Write ``arrays`` as a safetensors file at ``path``, crash-safely; returns ``(bytes, sha256)``.

    The file is written under a temporary name in the same directory, flushed and
    fsynced, then renamed over ``path`` (a rename is atomic), and the directory is
    fsynced: after a crash ``path`` is either absent or complete.
    """
    header, offset = {"__metadata__": dict(metadata)}, 0
    for name, a in arrays.items():
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text,
                      *(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
                        for a in arrays.values())):
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    return 8 + len(text) + offset, digest.hexdigest()


def read_arrays(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """The arrays of a safetensors file as read-only memory maps, and its metadata."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: truncated (header of {n} bytes in a file of {size})")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", {})
    arrays = {}
    for name, info in header.items():
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if 8 + n + end > size or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: truncated or corrupt (array {name!r} does not fit the file)")
        arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
                        if end > begin else np.zeros(shape, dtype))
    return arrays, metadata


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, replaced atomically (temporary file, fsync, rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


# --- token ids ---------------------------------------------------------------------------------

def id_bits(vocab_size: int) -> int:
    """Bits per stored id: 16 up to 2**16 ids, ``ceil(log2 V)`` up to 2**24, then 32."""
    bits = max(1, (vocab_size - 1).bit_length())
    return 16 if bits <= 16 else bits if bits <= 24 else 32


def id_encoding(vocab_size: int) -> str:
    bits = id_bits(vocab_size)
    return {16: "uint16", 32: "uint32"}.get(bits, f"packed{bits}")


def encode_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``ids [T, K]`` (int, padding slots already set to a valid id) in the encoding of ``vocab_size``."""
    bits = id_bits(vocab_size)
    if bits in (16, 32):
        return ids.astype(np.uint16 if bits == 16 else np.uint32)
    t, k = ids.shape
    # the low `bits` bits of each id, most significant first, then packed 8 to a byte
    as_bytes = ids.astype(">u4").view(np.uint8).reshape(t, k, 4)
    bit_rows = np.unpackbits(as_bytes, axis=2)[:, :, 32 - bits:]
    return np.packbits(bit_rows.reshape(t, k * bits), axis=1)


def decode_ids(stored: np.ndarray, vocab_size: int, k: int) -> np.ndarray:
    """The int64 ``[T, K]`` ids of ``encode_ids``' output."""
    bits = id_bits(vocab_size)
    if bits in (16, 32):
        return stored.astype(np.int64)
    t = stored.shape[0]
    bit_rows = np.unpackbits(stored, axis=1, count=k * bits).reshape(t, k, bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return bit_rows.astype(np.int64) @ weights


# --- log-probs ---------------------------------------------------------------------------------

def encode_logprobs(logprobs: np.ndarray, encoding: str) -> Dict[str, np.ndarray]:
    """The stored arrays of ``logprobs [T, K]`` (float32; ``-inf`` where a slot holds no mass)."""
    if encoding == "float16":
        return {"logprobs": logprobs.astype(np.float16)}
    finite = np.isfinite(logprobs)
    top = np.where(finite, logprobs, -np.inf).max(axis=1, initial=-np.inf)
    bottom = np.where(finite, logprobs, np.inf).min(axis=1, initial=np.inf)
    spread = np.where(np.isfinite(top), top - bottom, 0.0)
    step = (spread / _LEVELS).astype(np.float16)
    # float16 rounding may shrink the step: round it up so the smallest entry still gets a code <= 254
    short = step.astype(np.float32) * _LEVELS < spread
    step[short] = np.nextafter(step[short], np.float16(np.inf))
    with np.errstate(invalid="ignore", divide="ignore"):
        codes = np.rint((top[:, None] - logprobs) / step.astype(np.float32)[:, None])
    codes = np.where(step[:, None] > 0, codes, 0)
    codes = np.where(finite, np.clip(codes, 0, _LEVELS), NO_MASS_CODE)
    return {"logprob_codes": codes.astype(np.uint8), "logprob_step": step}


def decode_logprobs(arrays: Dict[str, np.ndarray], tail_logprob: np.ndarray, encoding: str) -> np.ndarray:
    """Float32 ``[T, K]`` log-probs (``-inf`` for no mass), renormalised so that the top-k mass
    plus ``exp(tail_logprob)`` is one."""
    if encoding == "float16":
        rel = arrays["logprobs"].astype(np.float64)
    else:
        codes = arrays["logprob_codes"]
        rel = -codes.astype(np.float64) * arrays["logprob_step"].astype(np.float64)[:, None]
        rel[codes == NO_MASS_CODE] = -np.inf
    top = rel.max(axis=1, initial=-np.inf)
    safe_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = safe_top + np.log(np.exp(rel - safe_top[:, None]).sum(axis=1))
        head = np.log(-np.expm1(tail_logprob.astype(np.float64)))  # log(1 - e^tail), exact near 0
        shift = np.where(np.isfinite(lse), head - lse, 0.0)
    return (rel + shift[:, None]).astype(np.float32)


def tail_from_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """``log(max(0, 1 - sum exp(logprobs)))`` per row: the tail when only the top-k are known."""
    with np.errstate(divide="ignore"):
        mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
        return np.log(np.clip(1.0 - mass, 0.0, None)).astype(np.float32)


def topk_kl(exact_logprobs: np.ndarray, exact_tail: np.ndarray, decoded_logprobs: np.ndarray,
            decoded_tail: Optional[np.ndarray] = None) -> np.ndarray:
    """Per row ``KL(exact || decoded)`` over the K + 1 buckets (top-k and tail): the encoding error."""
    decoded_tail = exact_tail if decoded_tail is None else decoded_tail
    p = np.concatenate([exact_logprobs, exact_tail[:, None]], axis=1).astype(np.float64)
    q = np.concatenate([decoded_logprobs, decoded_tail[:, None]], axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(np.isfinite(p), np.exp(p) * (p - q), 0.0)
    return terms.sum(axis=1)
