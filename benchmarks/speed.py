"""Inference speed of a model before and after pruning, measured in one run.

`python -m benchmarks.speed --model vgg16 --ratio 0.5 [--device cuda] [--amp] [--channels-last] [--json PATH]`
`python -m benchmarks.speed --model vgg16 --ratio 0.5 --runtime onnxruntime [--threads 1]`

Random weights (the speed does not depend on them); channels chosen by the weight-only `l1`
scorer through the main job's selection and surgery. Timing: `prune.pipeline.speed`'s (a warm-up,
then synchronised windows to a budget of `--seconds`, their median), alternating unpruned/pruned
`--repeats` times, best taken.

`--runtime onnxruntime` (CPU): in the same process, with the same batch and threads, times
each model in eager PyTorch (NCHW), eager channels-last, and ONNX Runtime (the graph
`--export onnx` writes: opset 17, CPUExecutionProvider, all graph optimisations), and
prints the pruned/unpruned speedup of each runtime and each runtime's speed over eager NCHW.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import scoring
from benchmarks.common import RESULTS, machine
from prune import (
    SPEED_SECONDS,
    Surgeon,
    Throughput,
    count_cost,
    create_model,
    exit_code,
    measure_throughput,
    onnx_bytes,
    select_and_prune,
    timed_throughput,
    write_json,
)

OPSET = 17
"""The ONNX opset of the graphs timed against ONNX Runtime (recorded in the JSON)."""


def pruned_pair(name: str, ratio: float, input_size: int, rounding: str,
                round_to: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unpruned, pruned) copies of model `name` with random weights (pruned widths aligned to `round_to`)."""
    torch.manual_seed(0)
    unpruned = create_model(name, num_classes=1000, pretrained=False).eval()
    pruned = create_model(name, num_classes=1000, pretrained=False).eval()
    pruned.load_state_dict(unpruned.state_dict())
    surgeon = Surgeon(pruned, torch.zeros(1, 3, input_size, input_size))
    select_and_prune(surgeon, scoring.create("l1"), None, ratio=ratio, rounding=rounding, round_to=round_to, quiet=True)
    return unpruned, pruned


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rounding", choices=("round", "floor-keep"), default="round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 256 on CUDA")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 on CUDA")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seconds", type=float, default=SPEED_SECONDS,
                   help="time budget of each measurement's timed windows (prune.pipeline.speed)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="onnxruntime: also time both models in ONNX Runtime beside eager NCHW and channels-last (CPU)")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/speed-<model>-r<ratio>-<device>.json")
    args = p.parse_args(argv)
    if args.runtime == "onnxruntime" and (args.device != "cpu" or args.amp):
        p.error("--runtime onnxruntime measures float32 on the CPU: drop --device and --amp")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    batch = args.batch_size or (256 if cuda else 16)
    unpruned, pruned = pruned_pair(args.model, args.ratio, args.input_size, args.rounding)
    flops = {k: count_cost(m, input_size=args.input_size).flops for k, m in (("unpruned", unpruned), ("pruned", pruned))}
    if args.runtime == "onnxruntime":
        return compare_runtimes(args, {"unpruned": unpruned, "pruned": pruned}, flops, batch=batch)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for key, model in (("unpruned", unpruned), ("pruned", pruned)):
            t = measure_throughput(model, input_size=args.input_size, batch_size=batch, device=args.device,
                                   amp=args.amp, channels_last=args.channels_last, seconds=args.seconds)
            if key not in best or t.img_per_s > best[key]["img_per_s"]:
                best[key] = {**t.as_dict(), "flops": flops[key]}
    result = {
        "model": args.model,
        "ratio": args.ratio,
        "rounding": args.rounding,
        "input_size": args.input_size,
        "unpruned": best["unpruned"],
        "pruned": best["pruned"],
        "speedup": best["pruned"]["img_per_s"] / best["unpruned"]["img_per_s"],
        "flops_ratio": flops["unpruned"] / flops["pruned"],
        "settings": {"batch_size": batch, "amp": args.amp, "channels_last": args.channels_last,
                     "threads": torch.get_num_threads(), "seconds": args.seconds, "repeats": args.repeats},
        "machine": machine(),
    }
    result["speedup_over_flops_ratio"] = result["speedup"] / result["flops_ratio"]
    print(f"{args.model} r={args.ratio} on {best['pruned']['device']} (batch {batch}, "
          f"{best['pruned']['dtype']}, channels_last={args.channels_last}, {torch.get_num_threads()} threads): "
          f"unpruned {best['unpruned']['img_per_s']:.1f} img/s, pruned {best['pruned']['img_per_s']:.1f} img/s, "
          f"speedup {result['speedup']:.2f}x, FLOPs ratio {result['flops_ratio']:.2f}x "
          f"(speedup/FLOPs ratio {result['speedup_over_flops_ratio']:.2f})")
    device_tag = "cuda" if cuda else "cpu"
    suffix = ("-amp" if args.amp else "") + ("-cl" if args.channels_last else "")
    write_json(args.json or RESULTS / f"speed-{args.model}-r{args.ratio:g}-{device_tag}{suffix}.json", result)
    return 0


def onnxruntime_throughput(graph: bytes, *, input_size: int, batch_size: int, seconds: float) -> Throughput:
    """Images per second of an ONNX `graph` in ONNX Runtime (CPU, torch's thread count) on random
    inputs, timed as `measure_throughput` times eager models."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    x = {"images": torch.randn(batch_size, 3, input_size, input_size).numpy()}
    return timed_throughput(lambda: session.run(None, x), batch_size=batch_size, seconds=seconds,
                            label="cpu (onnxruntime)")


def compare_runtimes(args: argparse.Namespace, models: dict, flops: dict, *, batch: int) -> int:
    """Unpruned vs pruned in eager NCHW, eager channels-last and ONNX Runtime, one process; JSON + ratios."""
    graphs = {k: onnx_bytes(m, input_size=args.input_size, opset=OPSET) for k, m in models.items()}
    import onnxruntime  # present: onnx_bytes checked it
    load_before = os.getloadavg()
    timers = {
        "eager": lambda k: measure_throughput(models[k], input_size=args.input_size, batch_size=batch,
                                              seconds=args.seconds),
        "eager_channels_last": lambda k: measure_throughput(models[k], input_size=args.input_size, batch_size=batch,
                                                            channels_last=True, seconds=args.seconds),
        "onnxruntime": lambda k: onnxruntime_throughput(graphs[k], input_size=args.input_size, batch_size=batch,
                                                        seconds=args.seconds),
    }
    best: dict[str, dict[str, dict]] = {r: {} for r in timers}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for key in models:
            for runtime, timer in timers.items():
                t = timer(key).as_dict()
                if key not in best[runtime] or t["img_per_s"] > best[runtime][key]["img_per_s"]:
                    best[runtime][key] = {**t, "flops": flops[key]}
    for runtime in best.values():
        runtime["speedup"] = runtime["pruned"]["img_per_s"] / runtime["unpruned"]["img_per_s"]
    over_eager = {r: {k: best[r][k]["img_per_s"] / best["eager"][k]["img_per_s"] for k in models} for r in best}
    result = {
        "model": args.model,
        "ratio": args.ratio,
        "rounding": args.rounding,
        "input_size": args.input_size,
        "runtimes": best,
        "over_eager_nchw": over_eager,
        "flops_ratio": flops["unpruned"] / flops["pruned"],
        "settings": {"batch_size": batch, "threads": torch.get_num_threads(), "seconds": args.seconds,
                     "repeats": args.repeats, "opset": OPSET, "onnxruntime": onnxruntime.__version__,
                     "providers": ["CPUExecutionProvider"]},
        "measured_seconds": round(time.perf_counter() - started, 1),
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before],
                                "after": [round(v, 2) for v in os.getloadavg()]},
        "machine": machine(),
    }
    for runtime, r in best.items():
        print(f"{runtime:20s} unpruned {r['unpruned']['img_per_s']:7.2f} img/s  pruned {r['pruned']['img_per_s']:7.2f} img/s  "
              f"speedup {r['speedup']:.2f}x  (vs eager NCHW: unpruned {over_eager[runtime]['unpruned']:.2f}x, "
              f"pruned {over_eager[runtime]['pruned']:.2f}x)")
    print(f"{args.model} r={args.ratio}, batch {batch}, {torch.get_num_threads()} threads, FLOPs ratio "
          f"{result['flops_ratio']:.2f}x, onnxruntime {onnxruntime.__version__}, opset {OPSET}")
    write_json(args.json or RESULTS / f"speed-{args.model}-r{args.ratio:g}-cpu-onnxruntime.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
