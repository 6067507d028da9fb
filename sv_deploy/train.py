"""Self-supervised training on one volume: the volume is the high-resolution side of its own pairs."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .backends import TorchBackend
from .config import DEAD_GAIN_DB, ArchConfig, Factors, Shape3, StageReport, TrainConfig
from .enhance import InferenceOptions, back_project, enhance_volume
from .errors import UserError
from .memory import heap_set_for_run
from .model import SVStage, cpu_layout, merge_members
from .progress import progress_bar
from .resize import downsample

MIN_LR_PATCH_YX = 8
HOLDOUT_FRACTION = 0.2  # share of the longer lateral axis kept out of training for validation
SMALL_INPUT_VOXELS = 300_000  # the paper's Fig. 8: quality saturates from about 0.3 M LR voxels


def min_patch(factors: Factors) -> Shape3:
    """Smallest HR patch that still gives an LR patch with context: 8 LR voxels in y-x, 2 in z."""
    return tuple(f * (MIN_LR_PATCH_YX if a > 0 else (2 if f > 1 else 1)) for a, f in enumerate(factors))  # type: ignore


def fit_patch(shape: Shape3, patch: Shape3, factors: Factors) -> Shape3:
    """Largest patch <= the requested one that fits the volume and divides by the factors."""
    minimum = min_patch(factors)
    out = tuple((min(n, p) // f) * f for n, p, f in zip(shape, patch, factors))
    if any(o < m for o, m in zip(out, minimum)):
        hint = ("; too few z slices to learn z from: enhance y and x only with --scale 1,2,2"
                if out[0] < minimum[0] and factors[0] > 1 and all(o >= m for o, m in zip(out[1:], minimum[1:])) else "")
        raise UserError(
            f"the volume ({'x'.join(map(str, shape))} z,y,x) is smaller than one training patch for "
            f"factors {factors} (at least {'x'.join(map(str, minimum))}); use a larger volume or a smaller --scale"
            f"{hint}"
        )
    return out  # type: ignore


def holdout_split(shape: Shape3, patch: Shape3, factors: Factors):
    """Split off the far end of the longer lateral axis for validation.

    Validating on a region the network never trained on catches memorization of the one volume
    we have; when the volume is too small to split, both use the whole volume (returns same slices).
    """
    axis = 1 if shape[1] >= shape[2] else 2
    n = shape[axis]
    need = factors[axis] * MIN_LR_PATCH_YX
    cut = n - max(need, int(round(n * HOLDOUT_FRACTION)))
    whole = (slice(None),) * 3
    if cut < max(need, patch[axis] // 2):
        return whole, whole
    train = [slice(None)] * 3
    val = [slice(None)] * 3
    train[axis], val[axis] = slice(0, cut), slice(cut, n)
    return tuple(train), tuple(val)


def split_for_training(shape: Shape3, patch: Shape3, factors: Factors):
    """(training region, held-out region, the patch training samples): the patch asked for, cut to
    fit the volume and then the part of it that trains (what `train` reports)."""
    patch = fit_patch(shape, patch, factors)
    train_region, val_region = holdout_split(shape, patch, factors)
    train_shape = tuple(len(range(*s.indices(n))) for s, n in zip(train_region, shape))
    return train_region, val_region, fit_patch(train_shape, patch, factors)


def sample_patches(volume: np.ndarray, patch: Shape3, count: int, rng: np.random.Generator,
                   turns: bool = True) -> np.ndarray:
    """Random crops with independent flips on each axis and quarter turns in y-x (square patches,
    and only with `turns`: not where y and x are scaled differently, as in the ensemble, `geometry`)."""
    out = np.empty((count, *patch), dtype=np.float32)
    for i in range(count):
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(volume.shape, patch)]
        crop = volume[tuple(slice(s, s + p) for s, p in zip(start, patch))]
        for axis in range(3):
            if rng.random() < 0.5:
                crop = np.flip(crop, axis)
        if turns and patch[1] == patch[2]:
            crop = np.rot90(crop, int(rng.integers(0, 4)), axes=(1, 2))
        out[i] = crop
    return out


def make_pairs(hr: np.ndarray, factors: Factors) -> Tuple[torch.Tensor, torch.Tensor]:
    lr = downsample(hr, factors)
    return torch.from_numpy(lr[:, None]), torch.from_numpy(hr[:, None])


def training_loss(pred: torch.Tensor, target: torch.Tensor, l1_weight: float) -> torch.Tensor:
    """Squared error plus `l1_weight` times absolute error. The squared error's pull on a residual
    fades with its size, the absolute error's does not, so residuals under `l1_weight / 2` are
    pulled to zero mostly by the second term; `_fit_member` sets the weight from interpolation's
    error, which makes that threshold the same fraction of it on every volume."""
    d = pred - target
    loss = torch.mean(d**2)  # not d * d (another gradient summation order): old runs repeat bit for bit
    return loss + l1_weight * torch.mean(d.abs()) if l1_weight else loss


def _mse(stage: SVStage, lr: torch.Tensor, hr: torch.Tensor, chunk: int, fn=None, bp_factors=None) -> float:
    """Mean squared error of `fn` (the stage) on pairs; with `bp_factors`, after back-projection with
    inference's default iterations, the baseline a network must beat to add anything (`evaluate`
    scores tricubic + back-projection beside it)."""
    fn = fn or stage
    total = 0.0
    with torch.no_grad():
        for i in range(0, lr.shape[0], chunk):
            pred = fn(lr[i : i + chunk])
            if bp_factors is not None:
                pairs = zip(pred.cpu().numpy()[:, 0], lr[i : i + chunk].cpu().numpy()[:, 0])
                fixed = [back_project(p, low, bp_factors, InferenceOptions().bp_iters) for p, low in pairs]
                pred = torch.from_numpy(np.stack(fixed)[:, None]).to(pred.device)
            total += float(torch.sum((pred - hr[i : i + chunk]) ** 2))
    return total / hr.numel()


def default_members(voxels: int) -> int:
    """Networks to average for an input of this many voxels: 3 below the paper's 0.3 M, else 1.

    On small inputs the trained network varies most from seed to seed (0.3-0.6 dB, QUALITY.md);
    the mean of three is better than a typical one and costs three times the training and network
    time, which small inputs can afford.
    """
    return 3 if voxels < SMALL_INPUT_VOXELS else 1


def member_seed(seed: int, member: int) -> int:
    """Member 0 keeps the run's seed (one member trains exactly as before); the others get
    independent streams derived from it."""
    if member == 0:
        return seed
    return int(np.random.SeedSequence([seed, member]).generate_state(1)[0])


def train_stage(
    volume: np.ndarray,
    factors: Factors,
    arch: ArchConfig,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = True,
    label: str = "train",
    back_projected: bool = True,
) -> Tuple[SVStage, StageReport]:
    """Train one stage on a normalized float32 volume: `arch.members` networks, each from its own
    seed and patches, each keeping its weights best on the same held-out patches; then merged.

    `back_projected`: inference back-projects this stage's output (the last of a chain), so it must
    also beat interpolation + back-projection; an earlier stage only has to beat interpolation."""
    start = time.perf_counter()
    train_region, val_region, patch = split_for_training(volume.shape, cfg.patch, factors)
    train_vol, val_vol = volume[train_region], volume[val_region]
    turns = factors[1] == factors[2]  # a quarter turn would swap differently scaled axes
    val_patch = fit_patch(val_vol.shape, patch, factors)
    rng = np.random.default_rng(cfg.seed)
    held_out = sample_patches(val_vol, val_patch, cfg.val_patches, rng, turns)
    val = tuple(cpu_layout(t.to(device), device) for t in make_pairs(held_out, factors))
    single = dataclasses.replace(arch, members=1)
    members, fits = [], []
    for k in range(arch.members):
        name = label if arch.members == 1 else f"{label} net {k + 1}/{arch.members}"
        member_rng = rng if k == 0 else np.random.default_rng(member_seed(cfg.seed, k))
        stage, fit = _fit_member(train_vol, patch, val, factors, single, cfg, member_seed(cfg.seed, k), member_rng,
                                 device, progress, name)
        members.append(stage)
        fits.append(fit)
    if arch.members == 1:
        stage, (best_step, train_loss, best_loss, interp_loss) = members[0], fits[0]
    else:
        stage = cpu_layout(merge_members(members).to(device), device)
        best_step, train_loss = max(f[0] for f in fits), float(np.mean([f[1] for f in fits]))
        interp_loss = fits[0][3]
        best_loss = _mse(stage, *val, cfg.batch)
        if _db(interp_loss, best_loss) < DEAD_GAIN_DB:  # the mean as a whole, as one member below
            _zero_residual(stage)
    stage.eval()
    bp_gain = None
    if back_projected:
        interp_bp, stage_bp = (_mse(stage, *val, cfg.batch, fn, bp_factors=factors) for fn in (stage.interpolate, stage))
        bp_gain = _db(interp_bp, stage_bp)
        if bp_gain < DEAD_GAIN_DB:  # back-projection alone does as well on held-out patches: use it
            _zero_residual(stage)
    report = StageReport(
        factors=tuple(factors),
        steps=cfg.steps,
        best_step=best_step,
        final_train_loss=train_loss,
        best_val_loss=best_loss,
        interp_val_loss=interp_loss,
        gain_db=_db(interp_loss, best_loss),
        seconds=time.perf_counter() - start,
        member_gains_db=tuple(_db(f[3], f[2]) for f in fits) if arch.members > 1 else (),
        bp_gain_db=bp_gain,
    )
    return stage, report


def _fit_member(train_vol, patch, val, factors, arch, cfg, seed, rng, device, progress, label):
    """One network from its own initial weights; returns it with its best validated weights and
    (best step, last training loss, best validation loss, interpolation's validation loss)."""
    torch.manual_seed(seed)
    val_lr, val_hr = val
    stage = cpu_layout(SVStage(factors, arch).to(device), device)
    averaged = copy.deepcopy(stage) if cfg.ema else stage  # what is validated and kept
    opt = torch.optim.Adam(stage.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=cfg.lr * 0.01)
    interp_loss = _mse(stage, val_lr, val_hr, cfg.batch, stage.interpolate)
    l1_weight = cfg.l1_weight * math.sqrt(interp_loss)  # in the units of the normalized residual
    best_loss, best_step, best_state = _mse(stage, val_lr, val_hr, cfg.batch), 0, copy.deepcopy(stage.state_dict())
    train_loss = float("nan")
    bar = progress_bar(cfg.steps, label, "step", progress)
    for step in range(1, cfg.steps + 1):
        patches = sample_patches(train_vol, patch, cfg.batch, rng, turns=factors[1] == factors[2])
        lr_t, hr_t = (cpu_layout(t.to(device), device) for t in make_pairs(patches, factors))
        loss = training_loss(stage(lr_t), hr_t, l1_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cfg.ema:
            _average_into(averaged, stage, 0.0 if step == 1 else cfg.ema)
        train_loss = float(loss.detach())
        if not math.isfinite(train_loss):
            raise UserError(f"{label}: training diverged (loss {train_loss}); try a lower --lr")
        if step % cfg.val_every == 0 or step == cfg.steps:
            val_loss = _mse(averaged, val_lr, val_hr, cfg.batch)
            if val_loss < best_loss:
                best_loss, best_step, best_state = val_loss, step, copy.deepcopy(averaged.state_dict())
            bar.set_postfix(loss=f"{train_loss:.2e}", val=f"{val_loss:.2e}", gain=f"{_db(interp_loss, best_loss):+.2f}dB")
        bar.update(1)
    bar.close()
    stage.load_state_dict(best_state)
    if _db(interp_loss, best_loss) < DEAD_GAIN_DB:  # (almost) nothing over interpolation on held-out
        # patches: be exactly interpolation, as the warning in `train_stages` says (a residual this
        # small was found to lose more often than win one scale up, QUALITY.md). Among averaged
        # networks such a member counts as interpolation in the mean. The measured loss is still
        # reported, so a network that made things worse shows as such.
        _zero_residual(stage)
    return stage.eval(), (best_step, train_loss, best_loss, interp_loss)


def _zero_residual(stage: SVStage) -> None:
    with torch.no_grad():
        stage.expand.weight.zero_()
        stage.expand.bias.zero_()


def _average_into(averaged: SVStage, stage: SVStage, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * stage, parameter by parameter (decay 0: copy)."""
    with torch.no_grad():
        for a, p in zip(averaged.parameters(), stage.parameters()):
            if decay == 0.0:
                a.copy_(p)
            else:
                a.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _db(reference: float, loss: float) -> float:
    return 10.0 * math.log10(reference / loss) if loss > 0 and reference > 0 else 0.0


@heap_set_for_run  # freed memory kept for the next step: 2-12 % less time (BENCH.md, session 22)
def train_stages(
    volume: np.ndarray,
    stages: Sequence[Factors],
    arch: ArchConfig,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = True,
    log: Callable[[str], None] = print,
    value_range: Optional[Tuple[float, float]] = None,
) -> Tuple[List[SVStage], List[StageReport]]:
    """Train the chain: each later stage learns on the previous stage's float output (no truncation)."""
    trained, reports = [], []
    x = volume
    if volume.size < SMALL_INPUT_VOXELS:
        log(
            f"warning: the input has {volume.size:,} voxels; Self-Vision learns from the input alone and the "
            f"paper (Fig. 8) found it overfits below about {SMALL_INPUT_VOXELS:,}: the network may add little "
            "over interpolation + back-projection. A larger field of view"
            f"{' usually helps.' if volume.shape[0] == 1 else ' or more z slices usually helps.'}"
        )
    for i, factors in enumerate(stages):
        label = f"stage {i + 1}/{len(stages)} x{'x'.join(map(str, factors))}"
        last = i == len(stages) - 1
        stage, report = train_stage(x, factors, arch, cfg, device, progress, label, back_projected=last)
        each = ""
        if report.member_gains_db:
            gains = ", ".join(f"{g:+.2f}" for g in report.member_gains_db)
            each = f" ({len(report.member_gains_db)} networks averaged; each alone: {gains} dB)"
        log(
            f"{label}: {report.steps} steps in {report.seconds:.1f} s, best at step {report.best_step}, "
            f"validation gain over interpolation {report.gain_db:+.2f} dB{each}"
            + (f", over interpolation + back-projection {report.bp_gain_db:+.2f} dB" if report.bp_gain_db is not None
               else " (not back-projected itself: the last stage back-projects the chain)")
        )
        if report.is_dead():
            added = (f"{report.gain_db:+.2f} dB over interpolation" if report.gain_db < DEAD_GAIN_DB else
                     f"{report.bp_gain_db:+.2f} dB over interpolation + back-projection")
            log(
                f"warning: {label}: the network added {added} on held-out patches (less than {DEAD_GAIN_DB} "
                f"dB), so this stage runs as cubic interpolation{' + back-projection' if i + 1 == len(stages) else ''}. "
                "More --steps or a larger input volume usually helps; a very noisy or nearly empty volume may "
                "hold nothing more to learn."
            )
        trained.append(stage)
        reports.append(report)
        if i + 1 < len(stages):
            # the next stage learns on what inference will give it: the chain so far, run from the
            # input without back-projection (only the chain's last stage back-projects)
            backend = TorchBackend(trained, device)
            options = InferenceOptions(bp_iters=0, interpolate=tuple(k for k, r in enumerate(reports) if r.is_dead()))
            x = enhance_volume(backend, stages[: i + 1], arch, volume, options, progress, value_range)
    return trained, reports
