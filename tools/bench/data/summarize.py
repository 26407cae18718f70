#!/usr/bin/env python3
"""Turns the JSON lines of tools/bench/data/run.sh into the Markdown table of BENCHMARKS.md."""

from __future__ import annotations

import json
import sys


def main() -> None:
    print(
        "| input | mode | chunk | workers | s | Mbp/s | M tokens/s | M tokens/CPU-s | packs "
        "| utilization | peak RSS MiB | CPU share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in sys.stdin:
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        name = d["inputs"][0].rsplit("/", 1)[-1]
        cpu_s = d.get("cpu_seconds") or float("nan")
        print(
            f"| {name} | {d['mode']} | {d['chunk_len']} | {d['workers'] or 'auto'} | {d['seconds']:.2f} "
            f"| {d['input_mbp_per_s']:.1f} | {d['mtokens_per_s']:.2f} | {d['tokens'] / cpu_s / 1e6:.2f} "
            f"| {d['packs']} | {d['utilization']:.4f} | {d['time_max_rss_kib'] / 1024:.1f} | {d['cpu']} |"
        )


if __name__ == "__main__":
    main()
