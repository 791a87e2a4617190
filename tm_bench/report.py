"""Plain-text tables of a ``run_embed_benchmark`` result."""
from __future__ import annotations

from typing import Any

from .device import format_breakdown

_HEADER = ("row", "mean ms", "p50 ms", "p90 ms", "p99 ms", "min ms", "img/s", "GFLOP", "floor ms", "floor %",
           "vs ORT GEMM %")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _label(row: dict[str, Any]) -> str:
    if row["engine"] == "onnxruntime" or row.get("runtime"):
        suffix = " (interleaved)" if row["phase"] == "interleaved" else ""
        engine = "ORT" if row["engine"] == "onnxruntime" else row["engine"]
        return f"{engine} {row['name']}{suffix}"
    return f"{row['engine']} embed"


def _engine(result: dict[str, Any]) -> str:
    engine = result.get("settings", {}).get("engine", "onnxruntime")
    return "ORT" if engine == "onnxruntime" else engine


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    out: list[str] = []
    m, s, e = result["machine"], result["settings"], result["export"]
    gemm = result["gemm"]
    out.append(f"machine: {m['cpu_model']}, {m['usable_cores']} usable cores, load {m.get('loadavg_1_5_15')}")
    if m.get("cpu_flags"):
        out.append("cpu flags: " + " ".join(f if on else f"-{f}" for f, on in m["cpu_flags"].items()))
    out.append("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v))
    out.append(f"export: {e['dir']} ({e['model']['name']}, {'+'.join(e['modalities'])}, "
               f"{e['model']['image_size']}px, weights {e['weights'].get('source')}, graphs "
               + ", ".join(f"{g}={v}" for g, v in e.get("graph_variants", {}).items()) + ")")
    if s.get("backend", "ort-cpu") != "ort-cpu":
        out.append(f"backend: {s['backend']}")
    if "openvino" in s:
        ov = s["openvino"]
        out.append(f"openvino {ov['openvino']}: {ov['device']} ({ov['full_device_name']}), precision {ov['precision']} "
                   f"(fp32 graphs: {', '.join(ov['fp32_graphs']) or 'none'}), capabilities "
                   f"{', '.join(ov['optimization_capabilities'])}")
    out.append(f"threads {s['threads']} (ORT intra-op{', torch' if s['compare_torch'] else ''}, BLAS), "
               f"warm-up {s['warmup']}, iterations {s['iters']}; ORT allow_spinning {s['ort'].get('allow_spinning')}, "
               f"force_spinning_stop {s['ort'].get('force_spinning_stop')}, "
               f"{s['ort'].get('graph_optimization_level')}")
    rates = ", ".join(f"{k} {v['gflops_best']:.1f}" for k, v in gemm.items()
                      if isinstance(v, dict) and "gflops_best" in v)
    out.append(f"sgemm rate (GFLOP/s, best of 7 2048^3): {rates}; floor uses {gemm['rate_source']} "
               f"{gemm['rate_gflops']:.1f} GFLOP/s")
    sessions = ", ".join(f"{g} {t:.2f}s" for g, t in result["session_creation_s"].items())
    out.append(f"session creation: {sessions}")
    mem = result["memory"]
    out.append(f"peak RSS: ORT phase {mem['peak_rss_ort_bytes'] / 2**20:.0f} MiB"
               + (f", torch phase {mem['peak_rss_with_torch_bytes'] / 2**20:.0f} MiB"
                  if mem.get("peak_rss_with_torch_bytes") else "")
               + (f"; the export's own peak RSS {mem['export_peak_rss_bytes'] / 2**20:.0f} MiB (manifest)"
                  if mem.get("export_peak_rss_bytes") else ""))
    for run in result["runs"]:
        flops = run["flops"]
        counted = (f", FlopCounterMode on {flops['flop_counter_model']}: {flops['flop_counter'] / 1e9:.2f}"
                   if "flop_counter" in flops else "")
        out.append("")
        out.append(f"batch {run['batch']}: floor = {run['floor_flops'] / 1e9:.2f} GFLOP (matmuls without attention"
                   f"{counted}; attention adds {flops['attention'] / 1e9:.2f}) / "
                   f"{gemm['rate_gflops']:.1f} GFLOP/s = {_ms(run['floor_s'])} ms")
        rows = [_HEADER]
        for r in run["rows"]:
            lat = r["latency_s"]
            rows.append((_label(r), _ms(lat["mean"]), _ms(lat["p50"]), _ms(lat["p90"]), _ms(lat["p99"]),
                         _ms(lat["min"]), f"{r['throughput_images_per_s']:.2f}", f"{r['floor_flops'] / 1e9:.2f}",
                         _ms(r["floor_s"]), f"{100 * r['floor_fraction']:.0f}%",
                         f"{100 * r['floor_fraction_by_rate'].get('onnxruntime', float('nan')):.0f}%"))
        out.append(_table(rows))
        for name, ratio in run.get("speedup_of_ort", {}).items():
            diff = run["max_abs_diff_vs_ort"][name]
            acc = run.get("accuracy_vs_terratorch_fp32", {}).get(name)
            cos = f"; token cosine vs terratorch fp32 min {acc['token_cosine_min']:.6f}" if acc else ""
            out.append(f"{_engine(result)} speed-up vs {name}: {ratio['median_ratio']:.2f}x (median/median), "
                       f"{ratio['paired_median_ratio']:.2f}x (median of paired ratios); "
                       f"max |diff| {diff['max_abs']:.1e} (rel {diff['max_rel']:.1e}){cos}")
        own = run.get("accuracy_vs_terratorch_fp32", {}).get(result["settings"].get("engine", "onnxruntime"))
        if own:
            out.append(f"{_engine(result)} token cosine vs terratorch fp32: min {own['token_cosine_min']:.6f}, "
                       f"mean {own['token_cosine_mean']:.6f}")
    out.append("")
    out.append("floor % = floor time (at the fastest sgemm rate) / median; vs ORT GEMM % = the same at ONNX "
               "Runtime's own MatMul rate; img/s = batch / median")
    if "device" in result:
        out.append("")
        out.append("per graph on the device, H2D / compute / D2H timed apart (as trtexec):")
        out += format_breakdown(result["device"])
    return "\n".join(out)


def format_markdown(result: dict[str, Any]) -> str:
    """The same tables as ``format_report``, as Markdown (for BENCHMARKS.md)."""
    gemm = result["gemm"]
    rates = ", ".join(f"{k} {v['gflops_best']:.0f}" for k, v in gemm.items()
                      if isinstance(v, dict) and "gflops_best" in v)
    m = result["machine"]
    out = [f"Load average at start / end: {m.get('loadavg_1_5_15', ['?'])[0]:.2f} / "
           f"{m.get('loadavg_end', ['?'])[0]:.2f}; sgemm GFLOP/s: {rates}; "
           f"floor rate {gemm['rate_gflops']:.0f} ({gemm['rate_source']})."]
    for run in result["runs"]:
        out.append("")
        out.append(f"Batch {run['batch']}: floor {run['floor_flops'] / 1e9:.2f} GFLOP -> {_ms(run['floor_s'])} ms")
        out.append("")
        out.append("| " + " | ".join(_HEADER) + " |")
        out.append("|" + "---|" * len(_HEADER))
        for r in run["rows"]:
            lat = r["latency_s"]
            cells = (_label(r), _ms(lat["mean"]), _ms(lat["p50"]), _ms(lat["p90"]), _ms(lat["p99"]), _ms(lat["min"]),
                     f"{r['throughput_images_per_s']:.2f}", f"{r['floor_flops'] / 1e9:.2f}", _ms(r["floor_s"]),
                     f"{100 * r['floor_fraction']:.0f}%",
                     f"{100 * r['floor_fraction_by_rate'].get('onnxruntime', float('nan')):.0f}%")
            out.append("| " + " | ".join(cells) + " |")
        for name, ratio in run.get("speedup_of_ort", {}).items():
            out.append(f"\n{_engine(result)} vs {name}: **{ratio['median_ratio']:.2f}x** (median / median), "
                       f"{ratio['paired_median_ratio']:.2f}x (median of paired per-iteration ratios)")
    return "\n".join(out)
