"""Token rows into padded tensors: left padding for prompts and contexts (the last real token of every row
aligned, as generation wants), right padding for targets and labels."""

from __future__ import annotations

import torch


def left_pad(rows: list[list[int]], pad_id: int | None, device: torch.device | str = "cpu",
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids, mask)``: the last real token of every row is aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists with ``value`` into ``(ids, mask)`` of ``width`` columns (default: the longest
    row; at least 1, so that rows that are all empty still make a tensor)."""
    width = max(1, width if width is not None else max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask
