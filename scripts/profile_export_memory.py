"""Where an export's memory goes: run ``tm-export`` in this process with every step's own peak RSS
recorded (Linux: the high-water mark is reset between steps), then print one row per step.

    PYTHONPATH=$PWD python scripts/profile_export_memory.py --model tiny --modalities S2L2A \\
        --output-modalities S1GRD LULC --random-init --seed 3 --winograd --out /tmp/x --overwrite

``cost`` is how far the step went above the RSS it started at; ``held`` what it left behind.
Every row also goes to stderr as its step ends (``# step ...``), so a run stopped half-way (out of
memory) still shows where it got to. ``--profile-json FILE`` (before the tm-export arguments)
writes the rows, the peak and the bytes written as JSON (tests/test_export_memory.py reads it).
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


def main(argv: list[str]) -> int:
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
