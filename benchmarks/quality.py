"""Quality and wall time of sv-deploy vs tricubic and tricubic + back-projection (no network).

Runs the real CLI (train, infer, evaluate --json) as a user would, on:
  (a) the Self-Vision authors' bead pair, x4 (5x128x128 -> 20x512x512);
  (b) each 3D volume in shared/data/real as truth, downsampled x2 by the degradation model;
  (c) the fly brain (56x256x256 crop as truth) at x4, the case the authors' code was run on.
  --set held-out: the 2D images (x2, x4) and cells3d at x4, kept out of every choice of default.
Writes benchmarks/results/quality_<tag>.json and prints a Markdown table.

    python benchmarks/quality.py --data ../shared/data --work /tmp/svq --tag cpu2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sv_deploy.bench import provenance
from sv_deploy.normalize import cast
from sv_deploy.resize import downsample
from sv_deploy.volume_io import read_volume, write_volume

HERE = Path(__file__).resolve().parent


def run(args, log):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sv_deploy", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write(f"$ sv-deploy {' '.join(args)}\n{proc.stderr}\n")
    if proc.returncode:
        raise SystemExit(f"failed: sv-deploy {' '.join(args)}\n{proc.stderr}")
    return proc.stdout, seconds


def make_pair(src: Path, work: Path, name: str, factor: int, channel=None, crop=None):
    """Truth = the volume cropped to a multiple of the factor; LR = degradation model, input dtype."""
    vol = read_volume(src, channel=channel)
    data = vol.data  # (1, y, x) for a 2D image, which is scaled in y and x only
    factors = (1 if vol.axes == "YX" else factor, factor, factor)
    if crop:
        data = data[tuple(slice(0, c) for c in crop)]
    data = data[tuple(slice(0, n // f * f) for n, f in zip(data.shape, factors))]
    lr = cast(downsample(data.astype(np.float32), factors), data.dtype)
    truth, low = work / f"{name}_truth.tif", work / f"{name}_lr.tif"
    lr_voxel = tuple(None if v is None else v * f for v, f in zip(vol.voxel_size, factors))
    write_volume(truth, [data], data.shape, data.dtype, vol.axes, vol.voxel_size)
    write_volume(low, [lr], lr.shape, lr.dtype, vol.axes, lr_voxel)
    return truth, low


def case(name, truth, low, scale, work, log, extra_train=()):
    model, out = work / f"{name}.svmodel", work / f"{name}_out.ome.tif"
    _, t_train = run(["train", str(low), "-o", str(model), "--scale", str(scale), "--overwrite", "-q", *extra_train], log)
    _, t_infer = run(["infer", str(model), str(low), "-o", str(out), "--overwrite", "-q"], log)
    text, _ = run(["evaluate", str(out), str(truth), "--lowres", str(low), "--json"], log)
    rows = json.loads(text)["rows"]
    info = json.loads(run(["info", str(model)], log)[0])
    gains = [s["gain_db"] for s in info["config"]["provenance"]["stages"]]
    bp_gains = [s.get("bp_gain_db") for s in info["config"]["provenance"]["stages"]]
    lr_shape = read_volume(low).data.shape
    return {
        "case": name, "scale": scale, "lr_shape": lr_shape, "train_s": t_train, "infer_s": t_infer,
        "stage_val_gain_db": gains, "stage_val_bp_gain_db": bp_gains, "train_args": list(extra_train),
        "ours": rows[0]["matched"], "tricubic": rows[1]["matched"], "tricubic_bp": rows[2]["matched"],
        "ours_raw": rows[0]["raw"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/sv-deploy-quality"))
    p.add_argument("--tag", default="cpu")
    p.add_argument("--only", nargs="*", help="run only these case names")
    p.add_argument("--set", default="main", choices=["main", "held-out", "all"],
                   help="main: the issue's table; held-out: cases kept out of every choice of default")
    p.add_argument("--recipe", default="fast", choices=["fast", "paper"])
    p.add_argument("--train-args", default="", help='extra `sv-deploy train` options, e.g. "--mid-layers 2"')
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    real = args.data / "real"
    beads = args.data / "svision-beads"
    cases = [
        ("beads_x4", lambda: (beads / "low_density_3d.tif", beads / "low_density_lr_3d.tif"), 4),
        ("3d_01_cells3d_x2", lambda: make_pair(real / "3d_01_cells3d_nuclei_confocal.tif", args.work, "3d_01", 2), 2),
        ("3d_02_flybrain_x2", lambda: make_pair(real / "3d_02_flybrain_confocal.tif", args.work, "3d_02", 2), 2),
        ("3d_08_nucleus_conf_x2", lambda: make_pair(real / "3d_08_PAIRED_nucleus_confocal_widefield.tif", args.work, "3d_08", 2, channel=0), 2),
        ("3d_10_chromosomes_x2", lambda: make_pair(real / "3d_10_chromosomes_neubias.tif", args.work, "3d_10", 2), 2),
        ("3d_02_flybrain_x4", lambda: make_pair(real / "3d_02_flybrain_confocal.tif", args.work, "3d_02x4", 4, crop=(56, 256, 256)), 4),
    ]
    # Held out: never used to choose a default, so they tell whether a choice generalises
    # (the two 2D images, and the cells3d volume at x4).
    held_out = [
        ("3d_01_cells3d_x4", lambda: make_pair(real / "3d_01_cells3d_nuclei_confocal.tif", args.work, "3d_01x4", 4), 4),
        ("2d_01_hipsc_x2", lambda: make_pair(real / "2d_01_bbbc034_hipsc_slice_C0.tif", args.work, "2d_01", 2), 2),
        ("2d_01_hipsc_x4", lambda: make_pair(real / "2d_01_bbbc034_hipsc_slice_C0.tif", args.work, "2d_01x4", 4), 4),
        ("2d_04_nuclei_x2", lambda: make_pair(real / "2d_04_dsb2018_nuclei_stardist.tif", args.work, "2d_04", 2), 2),
        ("2d_04_nuclei_x4", lambda: make_pair(real / "2d_04_dsb2018_nuclei_stardist.tif", args.work, "2d_04x4", 4), 4),
    ]
    cases = {"main": cases, "held-out": held_out, "all": cases + held_out}[args.set]
    results = []
    extra = ("--recipe", args.recipe, *args.train_args.split())
    with open(args.work / f"log_{args.tag}.txt", "w") as log:
        for name, pair, scale in cases:
            if args.only and name not in args.only:
                continue
            truth, low = pair()
            r = case(name, truth, low, scale, args.work, log, extra)
            results.append(r)
            print(f"{name}: ours {r['ours']['psnr']:.2f} dB / {r['ours']['ssim']:.4f}, tricubic "
                  f"{r['tricubic']['psnr']:.2f}, tricubic+BP {r['tricubic_bp']['psnr']:.2f}; "
                  f"train {r['train_s']:.0f} s, infer {r['infer_s']:.0f} s", flush=True)
    report = {
        **provenance(" ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])),
        "recipe": args.recipe,
        "set": args.set,
        "results": results,
    }
    out = HERE / "results" / f"quality_{args.tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report) -> str:
    lines = [
        "| case | LR shape | ours PSNR / SSIM | tricubic | tricubic + BP | ours - (tricubic+BP) | train s | infer s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        o, c, b = r["ours"], r["tricubic"], r["tricubic_bp"]
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['lr_shape']))} | {o['psnr']:.2f} / {o['ssim']:.4f} | "
            f"{c['psnr']:.2f} / {c['ssim']:.4f} | {b['psnr']:.2f} / {b['ssim']:.4f} | "
            f"{o['psnr'] - b['psnr']:+.2f} dB | {r['train_s']:.0f} | {r['infer_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
