"""Offline distillation: the teacher's top-k stored on disk once, read back by many students.

``TeacherCacheWriter`` writes sequences and their ``TopKTeacher`` rows (crash-safe,
resumable, one writer per rank); ``TeacherCache`` reads them (random access by
sequence, memory-mapped, checksummed; a ``torch.utils.data.Dataset``); ``collate``
makes training batches; ``to_axolotl`` / ``from_axolotl`` convert to and from
axolotl's KD columns in a Hugging Face dataset. ``python -m fastkd.cache build``
runs a teacher over text into a cache; ``python -m fastkd.cache inspect DIR``
summarises one. The format: ``docs/cache.md``.
"""
from .data import collate, from_axolotl, to_axolotl
from .store import CacheError, TeacherCache, TeacherCacheWriter

__all__ = ["TeacherCacheWriter", "TeacherCache", "CacheError", "collate", "to_axolotl", "from_axolotl"]
