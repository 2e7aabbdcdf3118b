"""Writing and reading a teacher cache: ``TeacherCacheWriter`` and ``TeacherCache`` (``docs/cache.md``).

A cache is a directory of shards (``shard-WWWWW-NNNNNN.safetensors``: writer ``W``'s
``N``-th shard) and one small JSON index per writer (``index-WWWWW.json``). A shard
holds whole sequences, at most ``shard_tokens`` tokens of them (one longer sequence
gets a shard of its own). The index lists the writer's shards with their token and
sequence counts, sizes and SHA-256 checksums; it is replaced atomically after each
shard, itself written under a temporary name, fsynced and renamed. So a writer
killed at any point leaves a cache whose index names only complete shards, and
``resume=True`` continues from the last one.
"""
import glob
import os
import re
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..core.topk import TopKTeacher
from . import format as fmt

__all__ = ["TeacherCacheWriter", "TeacherCache", "CacheError"]

_SHARD = "shard-{writer:05d}-{number:06d}.safetensors"
_INDEX = "index-{writer:05d}.json"
_INDEX_RE = re.compile(r"index-(\d{5})\.json$")
# what must agree between writers, and between a resumed writer and its index
_HEADER_KEYS = ("format", "version", "vocab_size", "k", "temperature", "tokenizer", "teacher", "encodings",
                "shard_tokens")


class CacheError(ValueError):
    """A cache that cannot be read or continued as asked (corrupt, truncated, inconsistent)."""


def _int_arg(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class TeacherCacheWriter:
    """Writes sequences and their teacher top-k to a cache directory (a context manager).

    ::

        with fastkd.cache.TeacherCacheWriter(dir, vocab_size=V, k=64, logprob_encoding="int8") as w:
            w.add(input_ids, teacher)   # input_ids [S]; teacher: TopKTeacher [S, K]

    Row ``i`` of ``teacher`` is the teacher's next-token distribution after
    ``input_ids[:i + 1]`` (the row of the logits at position ``i``, as ``teacher_topk``
    returns it from the hidden states). ``mask`` (bool ``[S]``, default all true) marks
    the rows that carry teacher data; the others are stored as empty rows.
    The teacher's log-probs are taken as they are (at the temperature the cache
    records); its ``tail_logprob``, when present, is stored, else it is derived from
    the log-probs (``log(1 - sum p)``).

    ``logprob_encoding``: ``"int8"`` (default; 1 byte per entry, a float16 step per row)
    or ``"float16"``. ``shard_tokens``: tokens per shard (at most; whole sequences).
    ``writer``: this writer's number (one per data-parallel rank: each writes its own
    shards and index; the reader merges them in writer order).
    ``resume=True`` continues a writer's earlier run: the shards its index names are
    verified (size, checksum), files it wrote after its last index update are removed,
    and ``num_sequences`` says how many sequences are already stored. Leaving the
    ``with`` block by an exception is treated as a crash: the sequences not yet in a
    shard are dropped (a resumed run writes them again, into the same shards). Without it, a
    directory that already holds this writer's index is an error (nothing is overwritten).
    """

    def __init__(self, directory: str, *, vocab_size: int, k: int, logprob_encoding: str = "int8",
                 temperature: float = 1.0, tokenizer: Optional[str] = None, teacher: Optional[str] = None,
                 shard_tokens: int = 1 << 20, writer: int = 0, resume: bool = False):
        _int_arg("vocab_size", vocab_size, 1)
        _int_arg("k", k, 1)
        _int_arg("shard_tokens", shard_tokens, 1)
        _int_arg("writer", writer, 0)
        if k > vocab_size:
            raise ValueError(f"k ({k}) must be at most vocab_size ({vocab_size})")
        if logprob_encoding not in fmt.LOGPROB_ENCODINGS:
            raise ValueError(f"logprob_encoding must be one of {fmt.LOGPROB_ENCODINGS}, got {logprob_encoding!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.directory = directory
        self.writer = writer
        self.header = {
            "format": fmt.FORMAT, "version": fmt.VERSION, "vocab_size": vocab_size, "k": k,
            "temperature": float(temperature), "tokenizer": tokenizer, "teacher": teacher,
            "shard_tokens": shard_tokens,
            "encodings": {"input_ids": "uint16" if vocab_size <= 1 << 16 else "uint32",
                          "topk_ids": fmt.id_encoding(vocab_size), "logprobs": logprob_encoding,
                          "tail_logprob": "float16", "mask": "uint8"},
        }
        os.makedirs(directory, exist_ok=True)
        self._index_path = os.path.join(directory, _INDEX.format(writer=writer))
        self.shards: List[dict] = []
        if os.path.exists(self._index_path):
            if not resume:
                raise CacheError(f"{self._index_path} exists: pass resume=True to continue that cache, "
                                 f"or write to a new directory")
            self._resume()
        self._buffer: List[Tuple[np.ndarray, ...]] = []
        self._buffered_tokens = 0
        self._closed = False

    # --- state -----------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        """Sequences stored on disk (after ``resume``, where to continue) plus those buffered."""
        return sum(s["sequences"] for s in self.shards) + len(self._buffer)

    def _resume(self):
        index = _load_index(self._index_path)
        for key in _HEADER_KEYS:
            if index.get(key) != self.header[key]:
                raise CacheError(f"cannot resume {self._index_path}: its {key} is {index.get(key)!r}, "
                                 f"this writer's is {self.header[key]!r}")
        for shard in index["shards"]:
            _verify_shard(self.directory, shard, checksum=True)
        self.shards = list(index["shards"])
        listed = {s["file"] for s in self.shards}
        pattern = os.path.join(self.directory, f"shard-{self.writer:05d}-*")
        for path in glob.glob(pattern) + glob.glob(self._index_path + ".tmp-*"):
            if os.path.basename(path) not in listed:  # written after the last index update, or a temporary
                os.remove(path)

    # --- writing ---------------------------------------------------------------------------
    def add(self, input_ids: torch.Tensor, teacher: TopKTeacher, mask: Optional[torch.Tensor] = None) -> None:
        """Append one sequence: ``input_ids [S]`` and ``teacher``, a ``TopKTeacher`` ``[S, K]``."""
        if self._closed:
            raise CacheError("this TeacherCacheWriter is closed")
        vocab, k = self.header["vocab_size"], self.header["k"]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [S], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        s = input_ids.shape[0]
        if not isinstance(teacher, TopKTeacher):
            raise TypeError(f"teacher must be a fastkd.TopKTeacher, got {type(teacher).__name__}")
        if tuple(teacher.indices.shape) != (s, k):
            raise ValueError(f"teacher must have shape [S, K] = [{s}, {k}] (the sequence's length and the "
                             f"cache's k), got {tuple(teacher.indices.shape)}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (s,)
                                 or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor [S] = [{s}], got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        ids = input_ids.detach().cpu().to(torch.int64).numpy()
        if s and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids must hold token ids in [0, {vocab}), got values in "
                             f"[{ids.min()}, {ids.max()}]")
        top_ids = teacher.indices.detach().cpu().numpy()
        if s and (top_ids.min() < -1 or top_ids.max() >= vocab):
            raise ValueError(f"teacher.indices must hold ids in [-1, {vocab}) (-1: padding slot)")
        logprobs = teacher.logprobs.detach().cpu().float().numpy()
        logprobs = np.where(top_ids >= 0, logprobs, -np.inf).astype(np.float32)
        tail = teacher.tail_logprob
        tail = fmt.tail_from_logprobs(logprobs) if tail is None else tail.detach().cpu().float().numpy()
        tail = np.minimum(tail.reshape(s), 0.0)  # a log of a mass: rounding may push it past 0
        rows = np.ones(s, bool) if mask is None else mask.cpu().numpy()
        self._buffer.append((ids, top_ids, logprobs, tail, rows))
        self._buffered_tokens += s
        if self._buffered_tokens >= self.header["shard_tokens"]:
            self._flush(keep_last=self._buffered_tokens > self.header["shard_tokens"] and len(self._buffer) > 1)

    def _flush(self, keep_last: bool = False) -> None:
        """Write the buffered sequences as one shard (all but the last when it would overflow the shard)."""
        batch = self._buffer[:-1] if keep_last else self._buffer
        self._buffer = self._buffer[-1:] if keep_last else []
        self._buffered_tokens = sum(len(b[0]) for b in self._buffer)
        if not batch:
            return
        ids, top_ids, logprobs, tail, rows = (np.concatenate([b[j] for b in batch]) for j in range(5))
        vocab, enc = self.header["vocab_size"], self.header["encodings"]
        top_ids = np.where(rows[:, None], top_ids, -1)
        logprobs = np.where(top_ids >= 0, logprobs, -np.inf).astype(np.float32)
        arrays = {
            "input_ids": ids.astype(np.uint16 if enc["input_ids"] == "uint16" else np.uint32),
            "topk_ids": fmt.encode_ids(np.maximum(top_ids, 0), vocab),  # padding: id 0 with no mass
            **fmt.encode_logprobs(logprobs, enc["logprobs"]),
            "tail_logprob": np.where(rows, tail, 0.0).astype(np.float16),
            "mask": rows.astype(np.uint8),
            "sequence_lengths": np.array([len(b[0]) for b in batch], np.uint32),
        }
        name = _SHARD.format(writer=self.writer, number=len(self.shards))
        size, digest = fmt.write_arrays(os.path.join(self.directory, name), arrays,
                                        {"format": fmt.FORMAT, "version": str(fmt.VERSION)})
        self.shards.append({"file": name, "tokens": int(len(ids)), "sequences": len(batch), "bytes": size,
                            "sha256": digest})
        self._write_index()
        if self._buffered_tokens >= self.header["shard_tokens"]:  # the kept sequence alone fills a shard
            self._flush()

    def _write_index(self) -> None:
        fmt.write_json(self._index_path, {**self.header, "writer": self.writer, "shards": self.shards})

    def close(self) -> None:
        """Write the buffered sequences and the index. Idempotent."""
        if self._closed:
            return
        self._flush()
        if not self.shards:
            self._write_index()  # an empty cache is still a cache
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # as after a crash: the index names the complete shards; buffered sequences are not written
            self._closed = True


def _load_index(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: cannot read the cache index ({e})") from None
    if index.get("format") != fmt.FORMAT or index.get("version") != fmt.VERSION:
        raise CacheError(f"{path}: not a {fmt.FORMAT} index of version {fmt.VERSION} "
                         f"(format {index.get('format')!r}, version {index.get('version')!r})")
    return index


def _verify_shard(directory: str, shard: dict, checksum: bool) -> str:
    path = os.path.join(directory, shard["file"])
    if not os.path.exists(path):
        raise CacheError(f"{path}: missing (listed in the cache index)")
    size = os.path.getsize(path)
    if size != shard["bytes"]:
        raise CacheError(f"{path}: {size} bytes, the index says {shard['bytes']} (truncated or replaced)")
    if checksum and fmt.file_sha256(path) != shard["sha256"]:
        raise CacheError(f"{path}: checksum mismatch (the file is corrupt)")
    return path


class TeacherCache(torch.utils.data.Dataset):
    """A teacher cache for reading: ``len(cache)`` sequences, ``cache[i] -> (input_ids, TopKTeacher)``.

    ``input_ids`` is int64 ``[S]``; the teacher holds int64 ids and float32 log-probs
    ``[S, K]`` (decoded, ``docs/cache.md``), ``mode="tail"``, and its ``tail_logprob``
    ``[S]``. Rows stored without teacher data have every id ``-1`` (padding slots:
    no mass). ``cache[a:b]`` gives a list. Shards are memory-mapped and opened on first
    use; with ``verify=True`` (default) each shard's SHA-256 is checked when it is
    first opened (a corrupt or truncated shard raises ``CacheError`` naming the file;
    nothing is skipped). A map-style ``torch.utils.data.Dataset``: use it with a
    ``DataLoader`` and ``fastkd.cache.collate``.
    """

    def __init__(self, directory: str, *, verify: bool = True):
        paths = sorted(p for p in glob.glob(os.path.join(directory, "index-*.json")) if _INDEX_RE.search(p))
        if not paths:
            raise CacheError(f"{directory}: no cache index (index-*.json) found")
        indexes = [_load_index(p) for p in paths]
        first = indexes[0]
        for path, index in zip(paths[1:], indexes[1:]):
            for key in _HEADER_KEYS:
                if index.get(key) != first.get(key):
                    raise CacheError(f"{path}: its {key} ({index.get(key)!r}) differs from {paths[0]}'s "
                                     f"({first.get(key)!r}); the writers of one cache must agree")
        self.directory = directory
        self.verify = verify
        self.header = {key: first[key] for key in _HEADER_KEYS}
        self.vocab_size, self.k = first["vocab_size"], first["k"]
        self.temperature = first["temperature"]
        self.shards = [s for index in indexes for s in index["shards"]]
        for shard in self.shards:
            _verify_shard(directory, shard, checksum=False)  # sizes now; checksums when opened
        self._first_sequence = np.cumsum([0] + [s["sequences"] for s in self.shards])
        self._open = {}

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def bytes_per_token(self) -> float:
        return sum(s["bytes"] for s in self.shards) / max(1, self.num_tokens)

    def __len__(self) -> int:
        return int(self._first_sequence[-1])

    def __getstate__(self):  # DataLoader workers open their own maps
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def _shard(self, number: int):
        if number not in self._open:
            shard = self.shards[number]
            path = _verify_shard(self.directory, shard, checksum=self.verify)
            try:
                arrays, _ = fmt.read_arrays(path)
            except (ValueError, KeyError) as e:
                raise CacheError(str(e)) from None
            starts = np.concatenate([[0], np.cumsum(arrays["sequence_lengths"], dtype=np.int64)])
            if len(starts) - 1 != shard["sequences"] or starts[-1] != shard["tokens"]:
                raise CacheError(f"{path}: its sequence lengths do not match the index")
            self._open[number] = (arrays, starts)
        return self._open[number]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"a TeacherCache index must be an int or a slice, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} is out of range for a cache of {n} sequences")
        i = int(i) % n
        number = int(np.searchsorted(self._first_sequence, i, side="right") - 1)
        arrays, starts = self._shard(number)
        j = i - int(self._first_sequence[number])
        a, b = int(starts[j]), int(starts[j + 1])
        return self.decode_rows(arrays, a, b)

    def decode_rows(self, arrays, a: int, b: int) -> Tuple[torch.Tensor, TopKTeacher]:
        """Rows ``[a, b)`` of an opened shard's ``arrays``, decoded."""
        enc = self.header["encodings"]
        ids = fmt.decode_ids(np.asarray(arrays["topk_ids"][a:b]), self.vocab_size, self.k)
        rows = {name: np.asarray(arrays[name][a:b]) for name in ("logprobs", "logprob_codes", "logprob_step")
                if name in arrays}
        tail = np.asarray(arrays["tail_logprob"][a:b]).astype(np.float32)
        logprobs = fmt.decode_logprobs(rows, tail, enc["logprobs"])
        ids = np.where(np.isfinite(logprobs), ids, -1)
        input_ids = torch.from_numpy(np.asarray(arrays["input_ids"][a:b]).astype(np.int64))
        return input_ids, TopKTeacher(torch.from_numpy(ids), torch.from_numpy(logprobs), mode="tail",
                                      tail_logprob=torch.from_numpy(tail))

    def __repr__(self) -> str:
        return (f"TeacherCache({self.directory!r}: {len(self)} sequences, {self.num_tokens} tokens, "
                f"V={self.vocab_size}, k={self.k}, logprobs={self.header['encodings']['logprobs']}, "
                f"{self.bytes_per_token:.1f} bytes/token)")
