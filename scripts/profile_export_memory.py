"""Where an export's memory goes: run ``tm-export`` in this process with every step's own peak RSS
recorded (Linux: the high-water mark is reset between steps), then print one row per step.

    PYTHONPATH=$PWD python scripts/profile_export_memory.py --model tiny --modalities S2L2A \\
        --output-modalities S1GRD LULC --random-init --seed 3 --winograd --out /tmp/x --overwrite

``cost`` is how far the step went above the RSS it started at; ``held`` what it left behind.
Every row also goes to stderr as its step ends (``# step ...``), so a run stopped half-way (out of
memory) still shows where it got to. ``--profile-json FILE`` (before the tm-export arguments)
writes the rows, the peak and the bytes written as JSON;

    python scripts/profile_export_memory.py --compare BEFORE.json AFTER.json

prints, per kind of step, the highest RSS it reached and the most it added, of two such profiles
(BENCHMARKS.md, "Export memory").
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from tm_export import cli, memory

GB = 1e9
HEADER = f"{'graph':<22}{'step':<26}{'rss before':>11}{'peak':>8}{'cost':>8}{'held':>8}{'s':>7}"


def export_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file() and p.name != "manifest.json")


def row(r: memory.StepRecord) -> str:
    return (f"{r.graph:<22}{r.step:<26}{r.rss_before / GB:>11.2f}{r.peak / GB:>8.2f}{r.cost / GB:>8.2f}"
            f"{(r.rss_after - r.rss_before) / GB:>8.2f}{r.seconds:>7.1f}")


# Step names (this code's and the code before issue 12's) -> the kind of work they do.
KINDS = {"reference model": "build the TerraMind model", "tokenizers": "load tokenizers",
         "load tokenizer": "load tokenizers", "specs (Winograd rewrite)": "decoder specs / Winograd rewrite",
         "decoder spec (Winograd rewrite)": "decoder specs / Winograd rewrite",
         "decoder spec": "decoder specs / Winograd rewrite", "trace": "trace", "simplify": "simplify (onnxslim)",
         "fp16": "fp16 conversion", "save": "serialise", "validate": "validate",
         "int8 quantise + gates": "int8 quantise + gates"}


def by_kind(profile: dict) -> dict[str, tuple[float, float, str]]:
    """kind -> (highest RSS reached, most added above the step's start, where), in GB."""
    out: dict[str, tuple[float, float, str]] = {}
    for r in profile["steps"]:
        kind = KINDS.get(r["step"])
        if kind is None:  # sub-steps of validate
            continue
        peak, cost = r["peak"] / GB, (r["peak"] - r["rss_before"]) / GB
        old = out.get(kind, (0.0, 0.0, ""))
        out[kind] = (max(old[0], peak), max(old[1], cost), r["graph"] if cost >= old[1] else old[2])
    return out


def compare(before: dict, after: dict) -> str:
    b, a = by_kind(before), by_kind(after)
    lines = ["| step | before: highest RSS | before: most added (graph) | after: highest RSS "
             "| after: most added (graph) |",
             "|---|---|---|---|---|"]
    for kind in dict.fromkeys(KINDS.values()):
        if kind not in a and kind not in b:
            continue
        cells = []
        for side in (b, a):
            peak, cost, graph = side.get(kind, (None, None, ""))
            where = f" ({graph})" if graph not in ("", "-") and cost >= 0.01 else ""
            cells += ["-", "-"] if peak is None else [f"{peak:.2f}", f"+{cost:.2f}{where}"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    for label, key in (("export peak RSS", "peak_rss_bytes"), ("bytes written", "export_bytes")):
        lines.append(f"| **{label}** | **{before[key] / GB:.2f}** | | **{after[key] / GB:.2f}** | |")
    bound = [2 * p["export_bytes"] / GB + 1.5 for p in (before, after)]
    lines.append(f"| bound 2 x bytes + 1.5 GB | {bound[0]:.2f} | | {bound[1]:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compare"]:
        before, after = (json.loads(Path(p).read_text()) for p in argv[1:3])
        print(compare(before, after))
        return 0
    json_path = None
    if argv[:1] == ["--profile-json"]:
        json_path, argv = Path(argv[1]), argv[2:]
    log = memory.StepLog(on_record=lambda r: print(f"# step {row(r)}", file=sys.stderr, flush=True))
    window = memory.PeakWindow()
    with memory.recording(log):
        rc = cli.main(argv)
    peak = window.close()
    if rc:
        return rc
    out = cli.build_parser().parse_args(argv).out
    total = export_bytes(out)
    print("\n" + HEADER)
    for r in log.records:
        print(row(r))
    print(f"\npeak RSS {peak / GB:.2f} GB; export {total / GB:.2f} GB; bound 2 x export + 1.5 GB = "
          f"{(2 * total + 1.5e9) / GB:.2f} GB")
    if json_path is not None:
        json_path.write_text(json.dumps({"peak_rss_bytes": peak, "export_bytes": total,
                                         "steps": [dataclasses.asdict(r) for r in log.records]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
