"""Scale factors: parsing what users type and splitting large factors into x2 stages."""

from __future__ import annotations

from typing import List, Tuple

from .config import Factors
from .errors import UserError

ALLOWED = (1, 2, 3, 4, 8)


def parse_scale(text: str, is_2d: bool = False) -> Factors:
    """'4' -> (4, 4, 4) for volumes, (1, 4, 4) for 2D images; '1,2,2' -> per-axis z, y, x."""
    spelled = str(text).strip().lower()
    spelled = spelled[1:] if spelled.startswith("x") else spelled  # 'x2', 'x1x2x2': as output names spell it
    try:
        parts = [int(p) for p in spelled.replace("x", ",").split(",")]  # an empty part ('2,') is refused
    except ValueError:
        raise UserError(f"--scale '{text}' is not understood; give one factor (2) or three (z,y,x: 1,2,2)") from None
    if len(parts) == 1:
        parts = [1 if is_2d else parts[0], parts[0], parts[0]]
    if len(parts) != 3:
        raise UserError(f"--scale '{text}' needs one factor or three (z,y,x), e.g. --scale 2 or --scale 1,2,2")
    if any(p not in ALLOWED for p in parts):
        raise UserError(f"--scale '{text}': each factor must be one of {', '.join(map(str, ALLOWED))}")
    if is_2d and parts[0] != 1:
        raise UserError(f"--scale '{text}' scales z, but the input is a 2D image; use --scale {parts[1]}")
    if parts == [1, 1, 1]:
        raise UserError("--scale 1 would not change the volume; use 2, 4 or per-axis factors like 1,2,2")
    return tuple(parts)  # type: ignore


def split_stages(total: Factors) -> Tuple[Factors, ...]:
    """Powers of two become chained x2 stages (x4 = two x2 stages, as in the paper); 3 is one stage."""
    per_axis: List[List[int]] = []
    for f in total:
        steps = []
        while f > 1 and f % 2 == 0:
            steps.append(2)
            f //= 2
        if f > 1:
            steps.append(f)
        per_axis.append(steps)
    count = max(len(s) for s in per_axis)
    return tuple(
        tuple(s[i] if i < len(s) else 1 for s in per_axis) for i in range(count)  # type: ignore
    )
