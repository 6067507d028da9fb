"""Score an enhanced volume against a reference, beside the no-network baselines."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np

from .config import Factors
from .enhance import back_project
from .errors import UserError
from .metrics import Scores, match_minmse, score
from .normalize import output_bounds
from .resize import upsample


@dataclass(frozen=True)
class Row:
    name: str
    matched: Scores  # after the min-MSE gain/offset match
    raw: Scores
    gain: float
    offset: float

    def to_dict(self) -> dict:
        return asdict(self)


def infer_factors(reference_shape: Sequence[int], lowres_shape: Sequence[int]) -> Factors:
    factors = []
    for r, l in zip(reference_shape, lowres_shape):
        if l == 0 or r % l:
            raise UserError(
                f"reference shape {tuple(reference_shape)} is not an integer multiple of the low-resolution "
                f"shape {tuple(lowres_shape)}; crop them so each axis divides"
            )
        factors.append(r // l)
    if all(f == 1 for f in factors):
        raise UserError("--lowres has the reference's own shape; give the low-resolution input the output was "
                        "made from")
    return tuple(factors)  # type: ignore


def voxel_size_mismatch(reference_size, lowres_size, factors: Sequence[int], tolerance: float = 0.05) -> str:
    """Axes where the LR voxel size is not the reference's times the factor the shapes imply ('' if
    none, or unknown): scored against a LR file of another sampling, the baselines say little."""
    axes = [a for a, r, l, f in zip("zyx", reference_size, lowres_size, factors)
            if r and l and abs(l - r * f) > tolerance * r * f]
    return ", ".join(axes)


def score_row(name: str, candidate: np.ndarray, reference: np.ndarray) -> Row:
    _, gain, offset = match_minmse(candidate, reference)
    return Row(name, score(candidate, reference, match=True), score(candidate, reference, match=False), gain, offset)


def evaluate(
    output: Optional[np.ndarray],
    reference: np.ndarray,
    lowres: Optional[np.ndarray] = None,
    bp_iters: int = 10,
    output_name: str = "output",
) -> List[Row]:
    """Rows for the output and, given the LR input, tricubic and tricubic + back-projection."""
    reference = reference.astype(np.float32)
    rows = []
    if output is not None:
        if output.shape != reference.shape:
            raise UserError(f"output shape {output.shape} differs from reference shape {reference.shape}; score "
                            "an output against the reference at its own scale (same z,y,x size)")
        rows.append(score_row(output_name, output, reference))
    if lowres is not None:
        factors = infer_factors(reference.shape, lowres.shape)
        lr = lowres.astype(np.float32)
        cubic = upsample(lr, factors)
        bounds = output_bounds(lowres.dtype, float(lowres.min()))  # clamped as our written output is
        tag = "x" + "x".join(map(str, factors)) if len(set(factors)) > 1 else f"x{factors[0]}"
        rows.append(score_row(f"tricubic {tag}", np.clip(cubic, *bounds), reference))
        if bp_iters > 0:
            bp = np.clip(back_project(cubic, lr, factors, bp_iters), *bounds)
            rows.append(score_row(f"tricubic {tag} + back-projection ({bp_iters} it)", bp, reference))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    width = max([len("candidate")] + [len(r.name) for r in rows])
    head = f"{'candidate':<{width}}  {'PSNR dB':>8} {'SSIM':>7} {'NRMSE':>7}  {'raw PSNR':>8} {'raw SSIM':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name:<{width}}  {r.matched.psnr:8.2f} {r.matched.ssim:7.4f} {r.matched.nrmse:7.4f}  "
            f"{r.raw.psnr:8.2f} {r.raw.ssim:8.4f}"
        )
    lines.append("higher PSNR and SSIM, lower NRMSE (RMSE / the reference's range) are better; scores after matching")
    lines.append("each candidate's gain/offset to the reference (min MSE); raw = as written")
    return "\n".join(lines)
