"""Turn a gpu_bench.py JSON result into the markdown table of docs/PERFORMANCE.md."""
import json
import sys


def table(path: str) -> str:
    d = json.load(open(path))
    rows = ["| benchmark | flame ms | torch ms | speedup | flame / torch rate | note |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        if "flame_ms" in r:
            rate = ""
            if "flame_GBps" in r:
                rate = f"{r['flame_GBps']} / {r['torch_GBps'] or '-'} GB/s"
            if "flame_TFLOPs" in r:
                rate = f"{r['flame_TFLOPs']} / {r['torch_TFLOPs'] or '-'} TFLOP/s"
            rows.append(f"| {r['bench']} | {r['flame_ms']} | {r['torch_ms'] or '-'} | {r['speedup'] or '-'} | {rate} | {r['note']} |")
        elif "torch_GBps" in r:
            rows.append(f"| {r['bench']} | | {r['torch_ms']} | | {r['torch_GBps']} GB/s | {r['note']} |")
        elif "value" in r:
            rows.append(f"| {r['bench']} | {r['value']} launches | | | | host {r['host_us_per_launch']} µs per launch at graph replay |")
        elif "error" in r:
            rows.append(f"| {r['bench']} | error | | | | {r['error']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1]))
