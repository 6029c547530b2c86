"""Aligned widths (`--round-to N`): does a pruned network's speed-up follow its FLOPs better when
every layer keeps a multiple of N channels?

    python -m benchmarks.round_to --model vgg16          # N = 1, 8, 16, 32 at ratio 0.5, 224², CPU
    python -m benchmarks.round_to --model resnet50 --threads 2

In one process: the unpruned model and one pruned copy per N (random weights, channels chosen by
`l1` through the main job's selection and surgery, `round_to=N`), each timed in eager PyTorch
(NCHW), eager channels-last and ONNX Runtime (as `benchmarks.speed --runtime onnxruntime`),
alternating `--repeats` times, best taken (every repeat kept in the JSON). Reported per N and
runtime: FLOPs ratio (unpruned / pruned), speed-up (pruned / unpruned img/s) and speed-up ÷ FLOPs
ratio (1: the time fell as much as the FLOPs). JSON: benchmarks/results/round_to-<model>-r<ratio>-cpu.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, markdown_table
from benchmarks.speed import OPSET, onnxruntime_throughput, pruned_pair
from prune import SPEED_SECONDS, count_cost, exit_code, measure_throughput, onnx_bytes, write_json

ROUND_TO = (1, 8, 16, 32)
RUNTIMES = ("eager", "eager_channels_last", "onnxruntime")


def timer(runtime: str, model: torch.nn.Module, graph: bytes, args: argparse.Namespace) -> float:
    """img/s of `model` (or its ONNX `graph`) in `runtime`."""
    kw = {"input_size": args.input_size, "batch_size": args.batch_size, "seconds": args.seconds}
    if runtime == "onnxruntime":
        return onnxruntime_throughput(graph, **kw).img_per_s
    return measure_throughput(model, channels_last=runtime == "eager_channels_last", **kw).img_per_s


def rows(result: dict) -> list[list]:
    out = []
    for n, r in result["round_to"].items():
        out.append([n, f"{r['flops_ratio']:.2f}", *(f"{r['speedup'][rt]:.2f} ({r['speedup_over_flops'][rt]:.2f})"
                                                    for rt in RUNTIMES)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.round_to", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", type=int, nargs="+", default=list(ROUND_TO))
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seconds", type=float, default=SPEED_SECONDS, help="time budget of each measurement")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"unpruned": pruned_pair(args.model, args.ratio, args.input_size, "round")[0]}
    for n in args.round_to:
        models[n] = pruned_pair(args.model, args.ratio, args.input_size, "round", round_to=n)[1]
    flops = {k: count_cost(m, input_size=args.input_size).flops for k, m in models.items()}
    graphs = {k: onnx_bytes(m, input_size=args.input_size, opset=OPSET) for k, m in models.items()}
    load_before, started = os.getloadavg(), time.perf_counter()
    measured: dict[str, dict] = {rt: {key: [] for key in models} for rt in RUNTIMES}
    for _ in range(args.repeats):
        for key, model in models.items():
            for rt in RUNTIMES:
                measured[rt][key].append(timer(rt, model, graphs[key], args))
    best = {rt: {key: max(values) for key, values in by_model.items()} for rt, by_model in measured.items()}
    result = {
        "model": args.model, "ratio": args.ratio, "input_size": args.input_size,
        "unpruned": {"flops": flops["unpruned"], "img_per_s": {rt: best[rt]["unpruned"] for rt in RUNTIMES},
                     "img_per_s_repeats": {rt: measured[rt]["unpruned"] for rt in RUNTIMES}},
        "round_to": {str(n): {
            "flops": flops[n], "flops_ratio": flops["unpruned"] / flops[n],
            "img_per_s": {rt: best[rt][n] for rt in RUNTIMES},
            "img_per_s_repeats": {rt: measured[rt][n] for rt in RUNTIMES},
            "speedup": {rt: best[rt][n] / best[rt]["unpruned"] for rt in RUNTIMES},
            "speedup_over_flops": {rt: best[rt][n] / best[rt]["unpruned"] / (flops["unpruned"] / flops[n])
                                   for rt in RUNTIMES},
            "channels": [m.out_channels for m in models[n].modules() if isinstance(m, torch.nn.Conv2d)],
        } for n in args.round_to},
        "settings": {"batch_size": args.batch_size, "threads": torch.get_num_threads(), "seconds": args.seconds,
                     "repeats": args.repeats, "opset": OPSET},
        "measured_seconds": round(time.perf_counter() - started, 1),
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before],
                                "after": [round(v, 2) for v in os.getloadavg()]},
        "machine": machine(),
    }
    print(markdown_table(["round to", "FLOPs ratio", *(f"speed-up {rt} (÷ FLOPs ratio)" for rt in RUNTIMES)],
                         rows(result)))
    write_json(args.json or RESULTS / f"round_to-{args.model}-r{args.ratio:g}-cpu.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
