"""Batches from a teacher cache, and axolotl's KD columns in and out of Hugging Face datasets."""
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.topk import TopKTeacher
from . import format as fmt

__all__ = ["collate", "to_axolotl", "from_axolotl"]


def collate(items: Sequence[Tuple[torch.Tensor, TopKTeacher]], *, pad_token_id: int = 0,
            ignore_index: int = -100) -> dict:
    """Pad ``(input_ids, TopKTeacher)`` items (``TeacherCache`` entries) to one batch.

    Returns a dict of ``[B, S]`` tensors (``S`` the longest sequence; shorter ones padded
    on the right):

    * ``input_ids`` (padding: ``pad_token_id``) and ``attention_mask`` (1 on real tokens);
    * ``target``: the next-token ids aligned with the positions, ``target[:, i] =
      input_ids[:, i + 1]``, and ``ignore_index`` where no loss counts (the last token
      of each sequence, padding, and rows stored without teacher data). It is aligned
      with the logits (already shifted): pass it as ``target=`` to fastkd's losses, not
      as a Hugging Face model's ``labels`` (which the model shifts again);
    * ``teacher``: a ``TopKTeacher`` ``[B, S, K]`` (padding rows: every id ``-1``) with its
      ``tail_logprob`` ``[B, S]``.

    ``fastkd.kd_loss(logits, batch["teacher"], target=batch["target"])`` and
    ``fused_linear_kd_loss(hidden, weight, batch["teacher"], batch["target"])`` take it as is.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    k = items[0][1].k
    for row, (_, teacher) in enumerate(items):
        if teacher.k != k:
            raise ValueError(f"every item's teacher must have the same k; item 0 has {k}, item {row} {teacher.k}")
    pad = torch.nn.utils.rnn.pad_sequence  # one copy per field for the whole batch
    lengths = torch.tensor([len(ids) for ids, _ in items])
    input_ids = pad([ids for ids, _ in items], batch_first=True, padding_value=pad_token_id)
    top_ids = pad([t.indices for _, t in items], batch_first=True, padding_value=-1)
    logprobs = pad([t.logprobs.float() for _, t in items], batch_first=True, padding_value=float("-inf"))
    tail = pad([t.tail_logprob if t.tail_logprob is not None else torch.zeros(len(ids)) for ids, t in items],
               batch_first=True, padding_value=0.0).float()
    attention = (torch.arange(input_ids.shape[1]) < lengths[:, None]).to(torch.int64)
    # position i counts when the next token is real and the row has teacher data
    target = torch.full_like(input_ids, ignore_index)
    counted = attention[:, 1:].bool() & (top_ids[:, :-1] >= 0).any(dim=-1)
    target[:, :-1] = torch.where(counted, input_ids[:, 1:], ignore_index)
    teacher = TopKTeacher(top_ids, logprobs, mode="tail", tail_logprob=tail)
    return {"input_ids": input_ids, "attention_mask": attention, "target": target, "teacher": teacher}


def to_axolotl(cache, indices: Optional[Iterable[int]] = None):
    """The cache as a Hugging Face ``datasets.Dataset`` with axolotl's KD columns.

    Columns per sequence: ``input_ids``, ``labels`` (``input_ids`` with -100 where the
    teacher has no data), ``attention_mask``, and per position ``target_token_ids``,
    ``target_logprobs``, ``target_mask`` (lists of K). axolotl's convention: position
    ``i`` holds the teacher's distribution *of token i* (predicted from the tokens
    before it) and its trainer shifts; fastkd's row ``i`` predicts token ``i + 1``. So
    axolotl's position ``i`` is fastkd's row ``i - 1``; position 0 is padding (mask 0),
    and fastkd's last row (the token after the sequence) has no place and is dropped.
    Padding slots: axolotl's ids ``0..K-1`` with log-prob ``-inf`` and mask 0.
    """
    import datasets

    rows = {name: [] for name in ("input_ids", "labels", "attention_mask", "target_token_ids",
                                  "target_logprobs", "target_mask")}
    for i in range(len(cache)) if indices is None else indices:
        ids, teacher = cache[i]
        s, k = len(ids), teacher.k
        top = torch.cat([torch.full((1, k), -1, dtype=torch.int64), teacher.indices[:-1]])
        lp = torch.cat([torch.full((1, k), float("-inf")), teacher.logprobs[:-1].float()])
        has = (top >= 0).any(dim=-1)
        filler = torch.arange(k).expand(s, k)
        rows["input_ids"].append(ids.tolist())
        rows["labels"].append(torch.where(has, ids, -100).tolist())
        rows["attention_mask"].append([1] * s)
        rows["target_token_ids"].append(torch.where(has[:, None], top, filler).tolist())
        rows["target_logprobs"].append(torch.where(has[:, None], lp, float("-inf")).tolist())
        rows["target_mask"].append(has[:, None].expand(s, k).to(torch.int64).tolist())
    return datasets.Dataset.from_dict(rows)


def from_axolotl(dataset, writer) -> int:
    """Write a dataset with axolotl's KD columns (``input_ids``, ``target_token_ids``,
    ``target_logprobs``, ``target_mask``) into a ``TeacherCacheWriter``; returns the
    number of sequences written. The inverse of ``to_axolotl`` (``target_mask``'s first
    entry per position says whether it has data); the tail is ``log(1 - sum p)`` of the
    given log-probs (``-inf`` for the renormalised log-probs axolotl's loaders store).
    """
    k = writer.header["k"]
    count = 0
    for row in dataset:
        ids = torch.as_tensor(row["input_ids"], dtype=torch.int64)
        s = len(ids)
        top = _positions(row["target_token_ids"], s, k, np.int64, -1, "target_token_ids")
        lp = _positions(row["target_logprobs"], s, k, np.float32, -np.inf, "target_logprobs")
        mask = _positions(row["target_mask"], s, k, np.int64, 0, "target_mask")[:, 0] != 0
        # axolotl's position i + 1 is fastkd's row i; the last row has no data
        top = np.concatenate([top[1:], np.full((1, k), -1)])
        lp = np.concatenate([lp[1:], np.full((1, k), -np.inf, np.float32)])
        has = np.concatenate([mask[1:], [False]])
        top = np.where(has[:, None] & np.isfinite(lp), top, -1)
        lp = np.where(top >= 0, lp, -np.inf).astype(np.float32)
        teacher = TopKTeacher(torch.from_numpy(top), torch.from_numpy(lp), mode="tail",
                              tail_logprob=torch.from_numpy(fmt.tail_from_logprobs(lp)))
        writer.add(ids, teacher, mask=torch.from_numpy(has))
        count += 1
    return count


def _positions(column: List[list], s: int, k: int, dtype, fill, name: str) -> np.ndarray:
    """A per-position column as ``[S, K]``, its rows cut or padded to K (axolotl keeps the mode of the widths)."""
    if len(column) != s:
        raise ValueError(f"{name} must have one entry per input id ({s}), got {len(column)}")
    out = np.full((s, k), fill, dtype)
    for i, entry in enumerate(column):
        entry = entry or []
        n = min(k, len(entry))
        out[i, :n] = entry[:n]
    return out
