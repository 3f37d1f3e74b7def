"""Turn a pytest-benchmark JSON into benchmarks/results/kernels-<device>.json and a markdown table.

    python benchmarks/summarize.py RAW.json benchmarks/results/kernels-h100.json
"""

import datetime
import json
import platform
import sys


def main(raw_path: str, out_path: str) -> None:
    import torch
    import triton

    with open(raw_path) as f:
        raw = json.load(f)
    rows = []
    for bench in raw["benchmarks"]:
        info = bench.get("extra_info", {})
        rows.append({"name": bench["name"], "group": bench["fullname"].split("::")[0],
                     "params": bench.get("params"), "ms": info.get("ms"), "gbps": info.get("gbps"),
                     "bytes": info.get("bytes"), "rounds": bench["stats"]["rounds"]})
    copy = next((r["gbps"] for r in rows if r["name"] == "test_copy_bandwidth"), None)
    for r in rows:
        r["fraction_of_copy"] = r["gbps"] / copy if copy and r["gbps"] else None
    payload = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "copy_bandwidth_gbps": copy,
        "results": rows,
    }
    with open(out_path, "w") as f:
        json.dump(payload, f, indent=1)
    print("| benchmark | ms | GB/s | of copy |\n|---|---|---|---|")
    for r in rows:
        frac = f"{r['fraction_of_copy']:.0%}" if r["fraction_of_copy"] else ""
        print(f"| {r['name']} | {r['ms']:.3f} | {r['gbps']:.0f} | {frac} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
