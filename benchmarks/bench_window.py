#!/usr/bin/env python3
"""Cost of one window (default 96³, batch 1) for Med3DFM and its named peers.

Models: the Med3DFM encoder and full segmenter (small variant), MONAI SwinUNETR (feature size 48)
and its Swin-ViT encoder, MONAI UNETR (ViT-B) and its ViT encoder. Random weights: cost does not
depend on the values. For each model, in a fresh process (so earlier allocator peaks do not hide
this one):

* parameters and FLOPs of one forward (`torch.utils.flop_counter.FlopCounterMode`; it counts
  2 × MACs for matmul / linear / convolution / attention and ignores element-wise work,
  normalisation and `grid_sample`);
* median seconds per forward under `torch.inference_mode()` for each `torch.set_num_threads(n)`;
* peak extra memory of a forward: CPU, peak RSS (`ru_maxrss`) after the first forward minus RSS
  just before it; CUDA, `torch.cuda.max_memory_allocated` minus the allocation before it;
* the share of the machine's measured peak matmul FLOP/s (a large float32 matmul, same threads)
  that the model reaches, and time / FLOP / parameter ratios against Med3DFM.

Writes `window.md` and `window.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# key: (label, reference model for ratios, kind)
MODELS: Dict[str, Dict[str, str]] = {
    "med3dfm_encoder": {"label": "Med3DFM encoder (small)", "ref": "med3dfm_encoder", "part": "encoder"},
    "med3dfm_segmenter": {"label": "Med3DFM segmenter (small, 14 classes)", "ref": "med3dfm_segmenter", "part": "full"},
    "swinunetr": {"label": "SwinUNETR (feature 48, 14 classes)", "ref": "med3dfm_segmenter", "part": "full"},
    "swinunetr_encoder": {"label": "SwinUNETR encoder (swinViT)", "ref": "med3dfm_encoder", "part": "encoder"},
    "unetr": {"label": "UNETR (ViT-B, 14 classes)", "ref": "med3dfm_segmenter", "part": "full"},
    "unetr_encoder": {"label": "UNETR encoder (ViT-B)", "ref": "med3dfm_encoder", "part": "encoder"},
}
NUM_CLASSES = 14


# --------------------------------------------------------------------------- worker side


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux ≥ 4.0); False if unsupported.

    Without a reset, `ru_maxrss` keeps the peak of model construction or imports, which can hide
    the peak of the forward pass that follows.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return peak_rss_bytes(from_status=True) is not None
    except OSError:
        return False


def peak_rss_bytes(from_status: bool = True) -> Optional[int]:
    """Peak RSS of this process: VmHWM (resettable) where /proc has it, else ru_maxrss."""
    if from_status:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def build_model(key: str, size: int):
    """The model to time and a function that runs one forward on a window."""
    import torch

    if key.startswith("med3dfm"):
        from Med3DFMLib.models import VARIANTS, DualBranchEncoder, SegmentationModel

        if key == "med3dfm_encoder":
            model = DualBranchEncoder(VARIANTS["small"])
        else:
            model = SegmentationModel(VARIANTS["small"], num_classes=NUM_CLASSES)
        return model, model
    if key.startswith("swinunetr"):
        from monai.networks.nets import SwinUNETR

        # MONAI >= 1.5 dropped `img_size`: the network adapts to any size divisible by 32.
        net = SwinUNETR(in_channels=1, out_channels=NUM_CLASSES, feature_size=48)
        if key == "swinunetr":
            return net, net
        return net.swinViT, lambda x: net.swinViT(x, net.normalize)
    if key.startswith("unetr"):
        from monai.networks.nets import UNETR

        net = UNETR(in_channels=1, out_channels=NUM_CLASSES, img_size=(size, size, size))
        if key == "unetr":
            return net, net
        return net.vit, net.vit
    raise ValueError(f"unknown model {key}")


def count_flops(run, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # CPU's fused attention kernel is not in the counter's table; count it like the GPU kernels.
    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.inference_mode(), counter:
        run(x)
    return int(counter.get_total_flops())


def time_forward(run, x, device, repeats: int, min_repeats: int, max_seconds: float, warm_up: bool = True) -> List[float]:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: List[float] = []
    started = time.perf_counter()
    with torch.inference_mode():
        if warm_up:
            run(x)
            sync()
        while len(times) < repeats:
            tick = time.perf_counter()
            run(x)
            sync()
            times.append(time.perf_counter() - tick)
            if len(times) >= min_repeats and time.perf_counter() - started > max_seconds:
                break
    return times


def worker_model(args: Dict[str, Any]) -> Dict[str, Any]:
    import psutil
    import torch

    device = torch.device(args["device"])
    threads = args["threads"]
    torch.set_num_threads(threads[0])
    torch.manual_seed(0)
    size = args["size"]
    if args["model"].startswith("swinunetr") and args.get("swin_size"):
        size = args["swin_size"]
    model, run = build_model(args["model"], size)
    model = model.eval().to(device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 1, size, size, size, device=device)

    # Memory of the first forward, before anything else ran in this process.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    hwm_reset = reset_peak_rss()
    rss_before = psutil.Process().memory_info().rss
    with torch.inference_mode():
        run(x)
    peak_rss = peak_rss_bytes(from_status=hwm_reset) or 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated(device) - base
    else:
        peak_extra = peak_rss - rss_before

    seconds: Dict[str, Any] = {}
    for i, n in enumerate(threads):
        torch.set_num_threads(n)
        # The memory probe above was the warm-up for the first thread count.
        times = time_forward(run, x, device, args["repeats"], args["min_repeats"], args["max_seconds"], warm_up=i > 0)
        seconds[str(n)] = {"median": statistics.median(times), "runs": times}
    torch.set_num_threads(threads[0])
    flops = count_flops(run, x)
    return {
        "size": size,
        "params": params,
        "flops": flops,
        "seconds": seconds,
        "peak_extra_bytes": int(max(peak_extra, 0)),
        "peak_rss_bytes": int(peak_rss),
        "peak_rss_reset": hwm_reset,
    }


def worker_matmul(args: Dict[str, Any]) -> Dict[str, Any]:
    """Peak float32 matmul FLOP/s: median of repeated n×n products."""
    import torch

    device = torch.device(args["device"])
    n = args["matmul_size"]
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out: Dict[str, Any] = {}
    for threads in args["threads"]:
        torch.set_num_threads(threads)
        times = []
        with torch.inference_mode():
            for i in range(args["matmul_repeats"] + 2):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tick = time.perf_counter()
                a @ b
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:  # first two are warm-up
                    times.append(time.perf_counter() - tick)
        median = statistics.median(times)
        out[str(threads)] = {"seconds": median, "flops_per_s": 2.0 * n**3 / median}
    return out


def run_in_fresh_process(script: Path, payload: Dict[str, Any], omp_threads: int, timeout: float, label: str) -> Dict[str, Any]:
    """Run `script --worker PAYLOAD` in a new interpreter; its result is the last line of its stdout.
    A fresh process per measurement keeps earlier runs' memory peaks and caches out of it."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(omp_threads)
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {label} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_worker(payload: Dict[str, Any], timeout: float = 3600, in_process: bool = False) -> Dict[str, Any]:
    """One measurement in a fresh interpreter, or in this one with `in_process` (quick smoke runs:
    peak memory then includes what earlier runs left)."""
    if in_process:
        result = worker_matmul(payload) if payload.get("kind") == "matmul" else worker_model(payload)
        return json.loads(json.dumps(result))
    threads = int(os.environ.get("OMP_NUM_THREADS", max(payload["threads"])))
    return run_in_fresh_process(Path(__file__).resolve(), payload, threads, timeout, payload.get("model", "matmul"))


# --------------------------------------------------------------------------- report side


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summarise(results: Dict[str, Any]) -> Dict[str, Any]:
    """Add derived figures: GFLOPs, share of peak matmul, ratios against the Med3DFM reference."""
    peak = results["peak_matmul"]
    for key, entry in results["models"].items():
        entry["gflops"] = entry["flops"] / 1e9
        entry["params_m"] = entry["params"] / 1e6
        entry["peak_extra_mib"] = entry["peak_extra_bytes"] / 2**20
        entry["fraction_of_peak"] = {
            n: (entry["flops"] / s["median"]) / peak[n]["flops_per_s"] for n, s in entry["seconds"].items()
        }
        ref = results["models"].get(MODELS[key]["ref"])
        if ref is not None:
            entry["ratio_vs_med3dfm"] = {
                "reference": MODELS[key]["ref"],
                "seconds": {n: s["median"] / ref["seconds"][n]["median"] for n, s in entry["seconds"].items()},
                "flops": entry["flops"] / ref["flops"],
                "params": entry["params"] / ref["params"],
                "peak_memory": entry["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1),
            }
    return results


def markdown(results: Dict[str, Any]) -> str:
    threads = [str(n) for n in results["settings"]["threads"]]
    size = results["settings"]["size"]
    device = results["settings"]["device"]
    mem_label = "peak extra GPU MiB" if device.startswith("cuda") else "peak extra RSS MiB"
    head = ["model", "params (M)", "GFLOPs"] + [f"s @{n} thr" for n in threads] + [mem_label]
    head += [f"% peak @{n} thr" for n in threads] + [f"time ÷ Med3DFM @{n} thr" for n in threads] + ["GFLOPs ÷ Med3DFM"]
    lines = [
        f"### One {size}³ window, batch 1, {device}, float32",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for key, entry in results["models"].items():
        ratio = entry.get("ratio_vs_med3dfm", {})
        label = MODELS[key]["label"] + ("" if entry.get("size", size) == size else f" at {entry['size']}³")
        row = [label, _fmt(entry["params_m"], 1), _fmt(entry["gflops"], 1)]
        row += [_fmt(entry["seconds"][n]["median"], 3) for n in threads]
        row += [_fmt(entry["peak_extra_mib"], 0)]
        row += [_fmt(100 * entry["fraction_of_peak"][n], 1) for n in threads]
        row += [_fmt(ratio.get("seconds", {}).get(n), 2) for n in threads]
        row += [_fmt(ratio.get("flops"), 2)]
        lines.append("| " + " | ".join(row) + " |")
    peak = results["peak_matmul"]
    n = results["settings"]["matmul_size"]
    lines += [
        "",
        "Peak float32 matmul ({0}×{0}, median): ".format(n)
        + ", ".join(f"{t} thread(s) {peak[t]['flops_per_s'] / 1e9:.1f} GFLOP/s" for t in threads)
        + ".",
        "",
        "Seconds: median of the runs listed in the JSON file (after one warm-up forward). "
        "FLOPs: `torch.utils.flop_counter.FlopCounterMode`, which counts 2 × MACs for matmul, linear, "
        "convolution and attention and ignores element-wise work, normalisation and `grid_sample`. "
        "Encoders are compared with the Med3DFM encoder, whole networks with the Med3DFM segmenter. "
        "Peak memory: extra memory of the first forward in a fresh process (weights excluded).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96, help="window edge in voxels (multiple of 32 for SwinUNETR)")
    parser.add_argument("--swin-size", type=int, default=None, help="window edge for SwinUNETR only (it needs ≥ 64; for smoke runs)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model and thread count")
    parser.add_argument("--min-repeats", type=int, default=3, help="slow models stop after this many once --max-seconds is spent")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time budget per model and thread count")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--matmul-size", type=int, default=None, help="peak matmul size (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--in-process", action="store_true", help="no fresh process per model (smoke runs; memory less exact)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        payload = json.loads(args.worker)
        result = worker_matmul(payload) if payload.get("kind") == "matmul" else worker_model(payload)
        print(json.dumps(result))
        return result

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available to PyTorch")
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    matmul_size = args.matmul_size or (8192 if args.device == "cuda" else 2048)
    settings = {
        "size": args.size,
        "threads": threads,
        "repeats": args.repeats,
        "min_repeats": min(args.min_repeats, args.repeats),
        "max_seconds": args.max_seconds,
        "device": args.device,
        "matmul_size": matmul_size,
        "swin_size": args.swin_size,
        "in_process": args.in_process,
    }
    started = time.perf_counter()
    results: Dict[str, Any] = {"settings": settings, "models": {}}
    results["peak_matmul"] = run_worker({"kind": "matmul", "device": args.device, "threads": threads, "matmul_size": matmul_size, "matmul_repeats": 7}, in_process=args.in_process)
    for key in models:
        tick = time.perf_counter()
        results["models"][key] = run_worker({"model": key, **settings}, in_process=args.in_process)
        print(f"[bench_window] {key}: {time.perf_counter() - tick:.1f} s", file=sys.stderr, flush=True)
    summarise(results)
    results["wall_seconds"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "window.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "window.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
