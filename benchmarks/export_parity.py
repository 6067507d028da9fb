"""Exported ONNX (fp32, fp16) on ONNX Runtime vs the torch model, on real trained models.

Uses the models, LR inputs and truths `benchmarks/quality.py` left in its --work folder, and runs the
real CLI: export, then infer with each backend (float32 output, so the comparison is not hidden by
rounding), then evaluate against the truth. Reports max |difference| to torch as a fraction of the
output range, PSNR against the torch output, the quality change against the truth, and wall times.

    python benchmarks/quality.py --tag cpu2 --work /tmp/svq          # trains the models first
    python benchmarks/export_parity.py --work /tmp/svq --tag cpu2
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
from sv_deploy.metrics import psnr
from sv_deploy.volume_io import read_volume

HERE = Path(__file__).resolve().parent
CASES = {  # case -> (LR file, truth file) inside --work, as quality.py names them
    "beads_x4": (None, None),
    "3d_02_flybrain_x2": ("3d_02_lr.tif", "3d_02_truth.tif"),
    "3d_10_chromosomes_x2": ("3d_10_lr.tif", "3d_10_truth.tif"),
}


def cli(*args):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sv_deploy", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: sv-deploy {' '.join(map(str, args))}\n{proc.stderr}")
    return proc.stdout, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    beads = args.data / "svision-beads"
    results = []
    for name, (lr_name, truth_name) in CASES.items():
        model = args.work / f"{name}.svmodel"
        if lr_name is None:
            low, truth = beads / "low_density_lr_3d.tif", beads / "low_density_3d.tif"
        else:
            low, truth = args.work / lr_name, args.work / truth_name
        exp = args.work / "export"
        _, t32 = cli("export", model, "-o", exp, "--overwrite")
        _, t16 = cli("export", model, "-o", exp, "--precision", "fp16", "--overwrite")
        runs = {
            "torch": model,
            "onnxruntime_fp32": exp / f"{name}.onnx",
            "onnxruntime_fp16": exp / f"{name}.fp16.onnx",
        }
        row = {"case": name, "export_s": {"fp32": t32, "fp16": t16}, "backends": {}}
        outputs = {}
        for label, source in runs.items():
            out = args.work / f"{name}_{label}.ome.tif"
            _, seconds = cli("infer", source, low, "-o", out, "--dtype", "float32", "--overwrite", "-q")
            text, _ = cli("evaluate", out, truth, "--lowres", low, "--json")
            outputs[label] = read_volume(out).data
            row["backends"][label] = {"infer_s": seconds, "vs_truth": json.loads(text)["rows"][0]["matched"]}
        ref = outputs["torch"]
        span = float(ref.max() - ref.min())
        for label, data in outputs.items():
            diff = float(np.abs(data - ref).max())
            row["backends"][label]["max_abs_diff_over_range"] = diff / span
            row["backends"][label]["psnr_vs_torch"] = None if diff == 0 else psnr(data, ref, span)
        results.append(row)
        b = row["backends"]
        print(f"{name}: ORT fp32 max diff {b['onnxruntime_fp32']['max_abs_diff_over_range']:.2e} of range; "
              f"fp16 {b['onnxruntime_fp16']['psnr_vs_torch']:.1f} dB vs torch, truth PSNR "
              f"{b['torch']['vs_truth']['psnr']:.3f} -> {b['onnxruntime_fp16']['vs_truth']['psnr']:.3f}", flush=True)
    report = {
        **provenance(" ".join(["python", "benchmarks/export_parity.py", *sys.argv[1:]])),
        "results": results,
    }
    out = HERE / "results" / f"export_parity_{args.tag}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
