"""Typed configuration saved inside every model file (no dicts of magic keys, no absolute paths)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

Factors = Tuple[int, int, int]
Shape3 = Tuple[int, int, int]


def total_factors(stages) -> Factors:
    """Per-axis product of chained stage factors."""
    z = y = x = 1
    for fz, fy, fx in stages:
        z, y, x = z * fz, y * fy, x * fx
    return (z, y, x)


@dataclass(frozen=True)
class ArchConfig:
    """One FSRCNN-style stage (GUIDE.md section 1)."""

    features: int = 16
    shrink: int = 6
    mid_layers: int = 2  # the authors used 4; 2 measured better on the x4 cases, see QUALITY.md
    groups: int = 1
    padding: str = "replicate"  # "zeros" as in the paper; replicate avoids fake dark borders in thin stacks
    # Independently trained copies of the network whose residuals are averaged, run as one wider
    # network (grouped convolutions). Averaging cuts the seed-to-seed spread that dominates on
    # small inputs (QUALITY.md, session 8); `train` picks 3 below the paper's 0.3 M voxels.
    members: int = 1
    # Border rule of the fixed interpolation path: "symmetric" mirrors as the degradation model
    # does, so a stage that learns nothing is exactly tricubic interpolation (QUALITY.md, session
    # 11); model files written before this field existed used "replicate" and still load so.
    interp_border: str = "symmetric"

    def halo(self) -> int:
        """Receptive-field radius in LR voxels: k5 (2) + shrink (1) + mid (m) + expansion (1)."""
        return self.mid_layers + 4


@dataclass(frozen=True)
class NormConfig:
    """Percentile normalization, computed once per volume (CSBDeep convention)."""

    low_percentile: float = 1.0
    high_percentile: float = 99.8


@dataclass(frozen=True)
class TrainConfig:
    """Per-stage training recipe; patch is (z, y, x) at the stage's input resolution."""

    steps: int = 800
    batch: int = 8
    patch: Shape3 = (16, 48, 48)
    lr: float = 1e-3
    seed: int = 0
    val_every: int = 25
    val_patches: int = 32
    # Validate and keep a running average of the weights (decay per step; 0: the raw weights). On
    # small inputs single steps' weights vary most from seed to seed (QUALITY.md, session 6).
    ema: float = 0.99
    # An absolute-error term beside the squared error, weighted relative to interpolation's RMS
    # error on the held-out patches: below about a tenth of that error it pulls residuals to zero
    # with constant force where the squared error's pull fades. Relative, so it suits a volume
    # close to its interpolation as well as one far from it (a fixed weight did not). Over seeds
    # 0-2: beads x4 +0.36 dB, the fly brain x2 above tricubic + back-projection in SSIM at each
    # seed, the other cases within their seed spread (QUALITY.md, session 25). 0: squared error
    # alone, the paper's loss.
    l1_weight: float = 0.2

    def __post_init__(self):
        if not 0 <= self.l1_weight < math.inf:  # NaN fails too; it would read as divergence
            raise ValueError(f"l1_weight {self.l1_weight}: a number >= 0")

    @classmethod
    def paper(cls, seed: int = 0) -> "TrainConfig":
        """The Self-Vision authors' recipe: 1500 steps, batch 8, 8x64x64 patches, lr 1e-3, squared error."""
        return cls(steps=1500, batch=8, patch=(8, 64, 64), lr=1e-3, seed=seed, l1_weight=0.0)


DEAD_GAIN_DB = 0.05  # a stage adding less than this over interpolation did not learn


@dataclass(frozen=True)
class StageReport:
    """What training one stage achieved, kept as provenance."""

    factors: Factors
    steps: int
    best_step: int
    final_train_loss: float  # the training objective: squared error, + the absolute-error term if any
    best_val_loss: float
    interp_val_loss: float
    gain_db: float
    seconds: float
    member_gains_db: Tuple[float, ...] = ()  # each averaged network's own gain, when there are several
    # Gain over interpolation + back-projection (as inference runs it) on the same held-out patches:
    # what the network adds beyond what back-projection alone recovers, measured before a fallback
    # on it (a stage that fell back on `gain_db` is interpolation already and reads 0). None in
    # model files written before it existed.
    bp_gain_db: Optional[float] = None

    def is_dead(self) -> bool:
        """The network added (almost) nothing on held-out patches, over its interpolation path or
        over interpolation + back-projection, so training zeroed its residual: the stage is exactly
        cubic interpolation, and inference (which back-projects) gives interpolation +
        back-projection, which it did not beat."""
        return self.gain_db < DEAD_GAIN_DB or (self.bp_gain_db is not None and self.bp_gain_db < DEAD_GAIN_DB)


@dataclass(frozen=True)
class Provenance:
    input_name: str
    input_sha256: str
    input_shape: Shape3
    input_dtype: str
    stages: Tuple[StageReport, ...]
    duration_s: float
    device: str
    created: str
    versions: Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild and apply a trained model."""

    stages: Tuple[Factors, ...]
    arch: ArchConfig = field(default_factory=ArchConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    norm_values: Tuple[float, float] = (0.0, 1.0)  # training input's (low, high) percentiles
    axes: str = "ZYX"
    voxel_size: Tuple[Optional[float], Optional[float], Optional[float]] = (None, None, None)
    train: TrainConfig = field(default_factory=TrainConfig)
    provenance: Optional[Provenance] = None

    def total_factors(self) -> Factors:
        return total_factors(self.stages)

    def interpolation_stages(self) -> Tuple[int, ...]:
        """Stages whose network learned nothing: inference runs them as `resize.upsample`, the
        same result (their interpolation path mirrors at borders as it does) without a network
        pass or an ensemble. Models with the older replicate border keep running the network."""
        if self.provenance is None or self.arch.interp_border != "symmetric":
            return ()
        return tuple(i for i, report in enumerate(self.provenance.stages) if report.is_dead())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Parsed and checked; any problem (a file from a newer or foreign writer, or made by hand:
        the checksum beside it is not a signature) is a ValueError, before a network is built."""
        try:
            config = _build(cls, json.loads(text))
            config.check()
        except (TypeError, KeyError, AttributeError, RecursionError, OverflowError) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        return config

    def check(self) -> None:
        """Ranges a model can have: a config asking for a 1000x factor or 10^7 channels would
        otherwise allocate without bound while the network is built."""
        def ints(values, low, high):
            return all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values)

        a = self.arch
        problems = [
            (not self.stages or len(self.stages) > 4 or not all(len(f) == 3 and ints(f, 1, 8) for f in self.stages),
             f"stages {self.stages}: 1 to 4 stages of three factors 1-8"),
            (not ints((a.features, a.shrink, a.members), 1, 256) or not ints((a.mid_layers,), 0, 32)
             or not ints((a.groups,), 1, 256) or a.shrink % a.groups,
             f"arch {a}: sizes out of range"),
            (a.padding not in ("zeros", "replicate", "reflect", "circular") or a.interp_border not in
             ("symmetric", "replicate"), f"arch padding {a.padding!r} / interp_border {a.interp_border!r}"),
            (self.axes not in ("ZYX", "YX"), f"axes {self.axes!r}: ZYX or YX"),
            (self.provenance is not None and not all(
                isinstance(r.gain_db, (int, float)) and isinstance(r.bp_gain_db, (int, float, type(None)))
                for r in self.provenance.stages), "provenance: stage gains must be numbers"),
            (len(self.norm_values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                   for v in self.norm_values), f"norm_values {self.norm_values}"),
            (not all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in
                     (self.norm.low_percentile, self.norm.high_percentile))
             or not 0 <= self.norm.low_percentile < self.norm.high_percentile <= 100,
             f"norm percentiles {self.norm.low_percentile}, {self.norm.high_percentile}: 0 <= low < high <= 100"),
        ]
        wrong = [why for bad, why in problems if bad]
        if wrong:
            raise ValueError("; ".join(wrong))


def _build(cls: Any, data: Any) -> Any:
    """Rebuild nested frozen dataclasses from asdict() output (lists become tuples)."""
    if data is None:
        return None
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if (cls, f.name) in _WHEN_ABSENT:
                kwargs[f.name] = _WHEN_ABSENT[(cls, f.name)]
            continue
        kwargs[f.name] = _convert(_field_type(cls, f.name), data[f.name])
    return cls(**kwargs)


# Fields whose default changed after model files were written without them: the value those
# files were made with, so they keep giving the output they were trained and checked for.
_WHEN_ABSENT = {(ArchConfig, "interp_border"): "replicate", (TrainConfig, "l1_weight"): 0.0}

_NESTED = {
    (ModelConfig, "arch"): ArchConfig,
    (ModelConfig, "norm"): NormConfig,
    (ModelConfig, "train"): TrainConfig,
    (ModelConfig, "provenance"): Provenance,
    (Provenance, "stages"): (StageReport,),
}


def _field_type(cls: Any, name: str) -> Any:
    return _NESTED.get((cls, name))


def _convert(kind: Any, value: Any) -> Any:
    if kind is None:
        return _tuplify(value)
    if isinstance(kind, tuple):
        return tuple(_build(kind[0], v) for v in value)
    return _build(kind, value)


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value
