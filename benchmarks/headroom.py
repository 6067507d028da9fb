"""How much can any x2 method gain over tricubic + back-projection on a volume? (no network)

For each 3D volume in shared/data/real, made into a pair exactly as `quality.py` does (the volume as
truth, its x2 shrink by the degradation model as input), scores against the truth:
  - tricubic, and tricubic + back-projection (10 iterations), the baselines of `quality.py`;
  - the best linear x2 upsampler, a 5x5x5-tap filter per sub-pixel phase fitted by least squares
    on the truth itself (an oracle: it sees the answer), with and without back-projection;
  - the same filter fitted self-supervised, one scale down (input shrunk once more -> input), as
    Self-Vision trains, and applied to the input;
with `--oracle-network`, also sv-deploy's own network trained on pairs made from the truth (truth
shrunk -> truth: the very mapping the test asks for) and applied to the input, ensemble and
back-projection as `infer` does; and prints the in-plane power spectrum of the truth in bands of 0.05 cycles/voxel relative to its
white-noise floor: where the spectrum is at the floor (ratio ~1) the truth holds noise only, which
no method can predict from the input.

    python benchmarks/headroom.py --data ../shared/data [--oracle-network --work /tmp/svh]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sv_deploy.bench import provenance
from sv_deploy.enhance import back_project
from sv_deploy.metrics import score
from sv_deploy.normalize import cast, output_bounds
from sv_deploy.resize import downsample, upsample
from sv_deploy.volume_io import read_volume

from quality import make_pair, run  # this folder's quality harness: the same pairs, the real CLI

HERE = Path(__file__).resolve().parent
VOLUMES = [("3d_01_cells3d_x2", "3d_01_cells3d_nuclei_confocal.tif", None),
           ("3d_02_flybrain_x2", "3d_02_flybrain_confocal.tif", None),
           ("3d_08_nucleus_conf_x2", "3d_08_PAIRED_nucleus_confocal_widefield.tif", 0),
           ("3d_10_chromosomes_x2", "3d_10_chromosomes_neubias.tif", None)]
TAPS = 5
PHASES = [(z, y, x) for z in range(2) for y in range(2) for x in range(2)]


def features(lr: np.ndarray) -> np.ndarray:
    """Each LR voxel's TAPS^3 neighbourhood (mirrored at borders, as the degradation model) and a 1."""
    r = TAPS // 2
    windows = sliding_window_view(np.pad(lr, r, mode="symmetric"), (TAPS,) * 3).reshape(-1, TAPS ** 3)
    return np.concatenate([windows, np.ones((windows.shape[0], 1), windows.dtype)], 1).astype(np.float64)


def fit_linear(lr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """Least-squares filter per phase: hr[2z+i, 2y+j, 2x+k] ~ features(lr) @ w_ijk."""
    x = features(lr)
    gram = x.T @ x
    gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))  # a whisker of ridge for conditioning
    targets = np.stack([hr[i::2, j::2, k::2].reshape(-1) for i, j, k in PHASES], 1).astype(np.float64)
    return np.linalg.solve(gram, x.T @ targets)


def apply_linear(weights: np.ndarray, lr: np.ndarray) -> np.ndarray:
    phases = (features(lr) @ weights).astype(np.float32)
    out = np.empty([2 * n for n in lr.shape], np.float32)
    for p, (i, j, k) in enumerate(PHASES):
        out[i::2, j::2, k::2] = phases[:, p].reshape(lr.shape)
    return out


def spectrum_over_floor(volume: np.ndarray, bands: int = 10) -> list:
    """Mean in-plane power per radial band (0 to 0.5 cycles/voxel) over the white-noise floor,
    estimated from the spectrum's corners beyond radius 0.6 (only noise reaches there)."""
    v = volume.astype(np.float64)
    power = (np.abs(np.fft.fft2(v - v.mean(axis=(1, 2), keepdims=True))) ** 2).mean(0)
    fy, fx = np.meshgrid(np.fft.fftfreq(v.shape[1]), np.fft.fftfreq(v.shape[2]), indexing="ij")
    radius = np.hypot(fy, fx)
    floor = power[radius > 0.6].mean()
    edges = np.linspace(0, 0.5, bands + 1)
    return [float(power[(radius >= a) & (radius < b)].mean() / floor) for a, b in zip(edges[:-1], edges[1:])]


def measure(path: Path, channel) -> dict:
    data = read_volume(path, channel=channel).data
    data = data[tuple(slice(0, n // 2 * 2) for n in data.shape)]  # as quality.make_pair
    truth = data.astype(np.float32)
    lr = cast(downsample(truth, (2, 2, 2)), data.dtype).astype(np.float32)
    even = lr[tuple(slice(0, n // 2 * 2) for n in lr.shape)]
    candidates = {
        "tricubic": upsample(lr, (2, 2, 2)),
        "oracle linear": apply_linear(fit_linear(lr, truth), lr),
        "self-supervised linear": apply_linear(fit_linear(downsample(even, (2, 2, 2)), even), lr),
    }
    bounds = output_bounds(data.dtype, float(lr.min()))  # clamped as `evaluate` and a written output are
    scores = {}
    for name, out in candidates.items():
        for suffix, y in (("", out), (" + BP", back_project(out, lr, (2, 2, 2), 10))):
            s = score(np.clip(y, *bounds), truth)
            scores[name + suffix] = {"psnr": s.psnr, "ssim": s.ssim}
    return {"truth_shape": list(truth.shape), "scores": scores, "spectrum_over_floor": spectrum_over_floor(truth)}


def oracle_network(case: str, name: str, channel, data: Path, work: Path, log) -> dict:
    """Train on the truth (its pairs are input -> truth), enhance the input, score as quality.py does."""
    truth, low = make_pair(data / "real" / name, work, case, 2, channel=channel)
    model, out = work / f"{case}_oracle.svmodel", work / f"{case}_oracle.ome.tif"
    run(["train", str(truth), "-o", str(model), "--scale", "2", "--overwrite", "-q"], log)
    run(["infer", str(model), str(low), "-o", str(out), "--overwrite", "-q"], log)
    rows = json.loads(run(["evaluate", str(out), str(truth), "--lowres", str(low), "--json"], log)[0])["rows"]
    return {"psnr": rows[0]["matched"]["psnr"], "ssim": rows[0]["matched"]["ssim"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--oracle-network", action="store_true", help="also train the network on the truth (minutes)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sv-deploy-headroom"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    log = open(args.work / f"log_{args.tag}.txt", "w")
    for case, name, channel in VOLUMES:
        results[case] = r = measure(args.data / "real" / name, channel)
        if args.oracle_network:
            r["scores"]["network trained on the truth"] = oracle_network(case, name, channel, args.data, args.work, log)
        base = r["scores"]["tricubic + BP"]["psnr"]
        print(f"{case} (truth {'x'.join(map(str, r['truth_shape']))})", flush=True)
        for k, s in r["scores"].items():
            print(f"  {k:30s} {s['psnr']:7.3f} dB  SSIM {s['ssim']:.4f}  vs tricubic + BP {s['psnr'] - base:+.3f} dB")
        print("  in-plane power / noise floor, bands of 0.05 cycles/voxel: "
              + " ".join(f"{v:.1f}" for v in r["spectrum_over_floor"]))
    report = {**provenance(" ".join(["python", "benchmarks/headroom.py", *sys.argv[1:]])), "results": results}
    out = HERE / "results" / f"headroom_{args.tag}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
