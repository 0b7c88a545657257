"""Which visual positions MoReS steers: ``ratio:F``, ``f{n}+l{m}``, ``uniform{n}``, ``all``."""

from __future__ import annotations

import re

import torch

POSITIONS_HELP = "ratio:F (>= 1 token) | f{n}+l{m} (first n, last m visual tokens) | uniform{n} | all"
_FL_RE = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


# --------------------------------------------------------------------------------------------------- positions


def select_positions(visual_mask: torch.Tensor, policy: str = "ratio:0.01") -> torch.Tensor:
    """Steered positions among each row's visual positions.

    Args:
        visual_mask: (B, T) bool, True at visual (placeholder) positions; any padding side.
        policy: see ``POSITIONS_HELP``. Ranks are counted among the visual positions of each row, so
            the selection does not depend on where the row starts.
    Returns:
        (B, T) bool, a subset of ``visual_mask``; every row with >= 1 visual token gets >= 1 position.
    """
    vm = visual_mask.bool()
    if vm.dim() != 2:
        raise ValueError(f"visual mask must be (B, T), got shape {tuple(vm.shape)}")
    count = vm.sum(1, keepdim=True)  # (B,1)
    rank = torch.cumsum(vm.long(), 1) - 1  # index of each visual token within its row
    policy = policy.strip().lower()
    if policy == "all":
        return vm.clone()
    if policy.startswith("ratio:") or policy.startswith("uniform"):
        if policy.startswith("ratio:"):
            try:
                frac = float(policy.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad positions policy {policy!r}: expected {POSITIONS_HELP}") from None
            if not 0.0 < frac <= 1.0:
                raise ValueError(f"positions ratio must be in (0, 1], got {frac}")
            n = torch.clamp(torch.round(count.double() * frac).long(), min=1)
        else:
            try:
                n = torch.full_like(count, int(policy[len("uniform"):]))
            except ValueError:
                raise ValueError(f"bad positions policy {policy!r}: expected {POSITIONS_HELP}") from None
            if int(n.min()) < 1:
                raise ValueError("uniform{n} needs n >= 1")
        n = torch.minimum(n, count.clamp(min=1))
        # evenly spaced picks: visual rank j is selected when it equals round(i * (c-1) / (n-1)) for some i
        sel = torch.zeros_like(vm)
        c = count.squeeze(1)
        for b in range(vm.shape[0]):
            cb, nb = int(c[b]), int(n[b, 0])
            if cb == 0:
                continue
            if nb == 1:
                picks = torch.tensor([(cb - 1) // 2])
            else:
                picks = torch.round(torch.arange(nb, dtype=torch.float64) * (cb - 1) / (nb - 1)).long()
            sel[b] = vm[b] & torch.isin(rank[b], picks.to(rank.device))
        return sel
    m = _FL_RE.match(policy)
    if m and (m.group(1) or m.group(2)):
        first = int(m.group(1) or 0)
        last = int(m.group(2) or 0)
        return vm & ((rank < first) | (rank >= count - last))
    raise ValueError(f"bad positions policy {policy!r}: expected {POSITIONS_HELP}")

