"""Pure parts of `sv-deploy bench`: timing statistics, the paper's reference rows, report text."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

# Table 1 of the Self-Vision paper, single NVIDIA TITAN X (GUIDE.md section 1).
PAPER = {
    "hardware": "NVIDIA TITAN X (paper, Table 1)",
    "train_s": 360.0,
    "2d_s": 0.5,  # 256x256 -> 1024x1024
    "3d_s": 62.0,  # 38x256x256 -> 152x1024x1024, ensemble and back-projection
}


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """trtexec-style statistics of repeated wall times (seconds)."""
    t = np.asarray(times, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarize")
    return {
        "runs": int(t.size),
        "min": float(t.min()),
        "median": float(np.median(t)),
        "mean": float(t.mean()),
        "p90": float(np.percentile(t, 90)),
        "p99": float(np.percentile(t, 99)),
        "max": float(t.max()),
    }


def speedup(reference_s: Optional[float], ours_s: Optional[float]) -> Optional[float]:
    if not reference_s or not ours_s:
        return None
    return reference_s / ours_s


#: How `sv-deploy infer` runs what each bench row timed (the full recipe; fast adds --no-ensemble).
INFER_WITH = {
    "torch eager (cpu)": "infer --backend torch --device cpu",
    "torch compiled (cpu)": "infer --compile --device cpu; timed after compiling, which each new pass shape pays first",
    "onnxruntime (cpu)": "infer --backend onnxruntime --device cpu",
    "torch eager (cuda)": "infer (the default on a GPU)",
    "torch compiled (cuda)": "infer --compile; timed after compiling, which each new pass shape pays first",
    "onnxruntime (cuda)": "infer --backend onnxruntime (with onnxruntime-gpu)",
    "tensorrt (plugin shuffle)": "export --engine, then infer the .plugin.trt.json",
    "tensorrt (built-in shuffle)": "export --engine --no-plugin, then infer the .builtin.trt.json",
}
#: Single runs of one row spread by 10-20 % on the 2-core machines (BENCH.md): a lead below this
#: is no reason to switch backends.
CLEAR_LEAD = 1.10


def fastest(rows: Sequence[dict]) -> List[dict]:
    """Per task (and input shape) and mode timed on more than one backend, the shortest file to
    file, the runner-up, and how infer runs the winner: which backend is faster depends on the
    machine (BENCH.md, session 20)."""
    by_key: Dict[tuple, List[dict]] = {}
    for r in rows:
        by_key.setdefault((r["task"], tuple(r.get("input_shape") or ()), r["mode"]), []).append(r)
    out = []
    for (task, _, mode), timed in by_key.items():
        if len({r["backend"] for r in timed}) < 2:
            continue
        best, second = sorted(timed, key=lambda r: r["file_to_file_s"])[:2]
        how = INFER_WITH.get(best["backend"])
        if how and mode == "fast":
            how = how.replace("infer", "infer --no-ensemble", 1)
        lead = second["file_to_file_s"] / best["file_to_file_s"]
        out.append({"task": task, "mode": mode, "backend": best["backend"], "file_to_file_s": best["file_to_file_s"],
                    "runner_up": second["backend"], "lead": lead, "clear": lead >= CLEAR_LEAD, "infer_with": how})
    return out


def _fastest_lines(report: dict) -> List[str]:
    lines = []
    for f in report.get("fastest", []):
        lead = (f"{f['lead']:.2f}x ahead of {f['runner_up']}" if f["clear"] else
                f"within {100 * (CLEAR_LEAD - 1):.0f} % of {f['runner_up']}: no clear winner")
        lines.append(f"{f['task']} {f['mode']}: {f['backend']}, {f['file_to_file_s']:.3f} s file to file, {lead}"
                     + (f" ({f['infer_with']})" if f.get("infer_with") else ""))
    return lines


def _machine(m: dict) -> str:
    """'AMD EPYC (family/model 26/2; avx2, avx512f; 2 CPUs, 23.5 GiB)': the name alone does not
    tell two CPU generations apart."""
    details = [f"family/model {m['cpu_family_model']}"] if m.get("cpu_family_model") else []
    details += [", ".join(m["cpu_flags"])] if m.get("cpu_flags") else []
    details += [f"{m['cpus']} CPUs" + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else "")]
    return f"{m['cpu']} ({'; '.join(details)})"


def markdown(report: dict) -> str:
    lines = [
        f"# sv-deploy bench ({'quick' if report['quick'] else 'full'}"
        f"{', interrupted: the rows measured before it' if report.get('interrupted') else ''})",
        "",
        f"{report['date']}, sv-deploy {report['version']}, commit {report.get('commit') or 'n/a'}; "
        f"machine: {_machine(report['machine'])}, GPU: {report['machine']['gpu'] or 'none'}.",
        f"Command: `{report['command']}`",
        "",
        "## Backends",
        "",
        "| backend | available | why not |",
        "|---|---|---|",
    ]
    for b in report["backends"]:
        lines.append(f"| {b['name']} | {'yes' if b['available'] else 'no'} | {b.get('reason') or ''} |")
    paper = report["paper"]
    lines += [
        "",
        f"The paper's Table 1 (Self-Vision, one TITAN X): training {paper['train_s']:.0f} s, 2D {paper['2d_s']} s, "
        f"3D {paper['3d_s']:.0f} s (full recipe)"
        + ("; not compared here: --quick times smaller volumes, one run each, so its ratios are only a smoke "
           "check, not a measurement." if report["quick"] else "."),
        "",
        "## Inference",
        "",
        "| task | mode | backend | compute median s (min / p90) | file to file s | voxels/s | peak RAM MiB (added by the row) | paper s (full recipe) | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["inference"]:
        c = r["compute"]
        lines.append(
            f"| {r['task']} | {r['mode']} | {r['backend']} | {c['median']:.3f} ({c['min']:.3f} / {c['p90']:.3f}) | "
            f"{r['file_to_file_s']:.3f} | {r['voxels_per_s']:.3g} | {r['peak_rss_mib']:.0f}{_added(r)} | "
            f"{_fmt(r.get('paper_s'))} | {_fmt(r.get('speedup'), 'x')} |"
        )
    if report.get("series"):
        lines += ["", "## Repeated inference (model file loaded once, files enhanced one after another)", "",
                  "| task | mode | backend | files | model load s | time to first output s | per file s, median (min / max) |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["series"]:
            per = r["per_file"]
            each = f"{per['median']:.3f} ({per['min']:.3f} / {per['max']:.3f})" if per else ""
            lines.append(f"| {r['task']} | {r['mode']} | {r['backend']} | {r['files']} | {r['load_s']:.2f} | "
                         f"{r['first_output_s']:.2f}{_cached(r, '*')} | {each} |")
        if any(r.get("export_cached") for r in report["series"]):
            lines += ["", "\\* the ONNX export cache held this model already (--quick), so this time leaves out "
                      "the export that a new model's first use costs (seconds)."]
    gpu_rows = [r for r in report["inference"] if r.get("host_to_device") or r.get("peak_device_mib") is not None]
    if gpu_rows:
        lines += ["", "## GPU transfers and memory (per file, median)", "",
                  "| task | mode | backend | host->device s | device->host s | peak device MiB |", "|---|---|---|---|---|---|"]
        for r in gpu_rows:
            h2d, d2h = r.get("host_to_device"), r.get("device_to_host")
            seconds = [f"{t['median']:.4f}" if t else "" for t in (h2d, d2h)]
            lines.append(f"| {r['task']} | {r['mode']} | {r['backend']} | {seconds[0]} | {seconds[1]} | "
                         f"{_fmt(r.get('peak_device_mib'))} |")
    if report.get("training"):
        lines += ["", "## Training", "", "| recipe | steps x stages | seconds | paper s | speedup |", "|---|---|---|---|---|"]
        for t in report["training"]:
            lines.append(f"| {t['recipe']} | {t['steps']} x {t['stages']} | {t['seconds']:.1f} | "
                         f"{_fmt(t.get('paper_s'))} | {_fmt(t.get('speedup'), 'x')} |")
    if report.get("fastest"):
        lines += ["", "## Fastest of the backends timed here", ""]
        if report["quick"]:
            lines += ["--quick: small volumes, one run each; a smoke check, not a choice to make from it.", ""]
        elif report.get("interrupted"):
            lines += ["Interrupted: some backends were not timed.", ""]
        lines += [f"- {line}" for line in _fastest_lines(report)]
    if report.get("ratios"):
        lines += ["", "## ONNX Runtime vs torch (same run)", ""]
        for k, v in report["ratios"].items():
            lines.append(f"- {k}: torch / onnxruntime median time = {v:.2f}")
    lines += ["", "Not measured: " + "; ".join(report["not_measured"]) if report["not_measured"] else ""]
    return "\n".join(lines).rstrip() + "\n"


def _cached(row: dict, mark: str) -> str:
    return mark if row.get("export_cached") else ""


def _added(row: dict) -> str:
    """The row's own share of the process's peak: what earlier rows left allocated (ONNX Runtime's
    arena, caches) shows in the peak but not here."""
    added = row.get("rss_added_mib")
    return "" if added is None else f" (+{added:.0f})"


def _fmt(value, suffix="") -> str:
    return "" if value is None else f"{value:.2f}{suffix}"


def table(report: dict) -> List[str]:
    rows = [f"{'task':<8} {'mode':<5} {'backend':<22} {'median s':>9} {'file s':>8} {'paper s':>8} {'speedup':>8}"]
    rows = rows if report["inference"] or report.get("training") else []
    rows = [f"not available: {b['name']} ({b.get('reason')})" for b in report["backends"] if not b["available"]] + rows
    for r in report["inference"]:
        rows.append(
            f"{r['task']:<8} {r['mode']:<5} {r['backend']:<22} {r['compute']['median']:>9.3f} "
            f"{r['file_to_file_s']:>8.3f} {_fmt(r.get('paper_s')):>8} {_fmt(r.get('speedup'), 'x'):>8}"
        )
    for r in report.get("series", []):
        per = r["per_file"]
        rows.append(f"{r['task']:<8} {r['mode']:<5} {r['backend']:<22} first output {r['first_output_s']:.2f} s"
                    + _cached(r, " (export cached)")
                    + (f", then {per['median']:.3f} s per file ({r['files']} files)" if per else ""))
    for t in report.get("training", []):
        rows.append(f"train    {t['recipe']:<5} {'':<22} {t['seconds']:>9.1f} {'':>8} "
                    f"{_fmt(t.get('paper_s')):>8} {_fmt(t.get('speedup'), 'x'):>8}")
    if not report["quick"]:
        rows += [f"fastest here, {line}" for line in _fastest_lines(report)]
    return rows
