#!/usr/bin/env python3
"""A whole CT segmented end to end: load → preprocess → infer → postprocess → write.

The input is a real CT: the 512×512×20 DICOM series in `Testing/Data/totalseg/example_ct_dicom`
(0.98×0.98×2 mm), extended along z to `--slices` slices by mirrored tiling of its real slices
(0, 1, …, 19, 18, …, 1, 0, 1, … — every slice is a real slice, and neighbours stay neighbours) and
written as a new DICOM series (or NRRD with `--input-format nrrd`) with the same in-plane grid,
slice spacing and orientation. The run then uses the library's own functions: `read_volume`,
`segment_image` (which times `to_model_input`, `predict_volume` with its sliding windows and
Gaussian blending, and `probabilities_to_labels`) and `write_seg_nrrd`, in a fresh process whose
peak RSS is reported.

The model is the bundled `--model` if it loads (its weights and labels, but the benchmark's CT input
spec, so every run does the same work); otherwise `SegmentationModel(VARIANTS["small"])` with random
weights and `--classes` classes — speed does not depend on the weights.

Peer: MONAI's SwinUNETR through `monai.inferers.sliding_window_inference` on the same resampled
array with the same windows, overlap, blending and threads. It takes seconds per window on a CPU,
so by default it runs on a crop holding `--swin-windows` windows and its whole-volume time is
EXTRAPOLATED (seconds per window × the number of windows of the whole volume); `--swin-full` runs it
for real.

`--scaling` measures time and peak memory of Med3DFM against volume size and against overlap and
writes PNG plots when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_window import peak_rss_bytes, reset_peak_rss, run_in_fresh_process  # noqa: E402

DICOM_DIR = ROOT / "Testing" / "Data" / "totalseg" / "example_ct_dicom"
STAGES = ["load", "preprocess", "infer", "postprocess", "write"]


# --------------------------------------------------------------------------- input volume


def mirrored_indices(count: int, available: int) -> List[int]:
    """0, 1, …, n-1, n-2, …, 1, 0, 1, … : `count` slice indices that walk back and forth."""
    if available == 1:
        return [0] * count
    period = 2 * (available - 1)
    out = []
    for k in range(count):
        i = k % period
        out.append(i if i < available else period - i)
    return out


def make_ct(slices: int, xy: int, folder: Path, input_format: str = "dicom") -> Path:
    """Write the extended real CT (see the module docstring) and return the path to read."""
    import numpy as np
    import SimpleITK as sitk

    from Med3DFMLib.io.volumes import read_volume

    source = read_volume(DICOM_DIR)
    array = sitk.GetArrayFromImage(source)  # (z, y, x)
    _, height, width = array.shape
    y0, x0 = max((height - xy) // 2, 0), max((width - xy) // 2, 0)
    array = array[:, y0 : y0 + xy, x0 : x0 + xy]
    extended = np.ascontiguousarray(array[mirrored_indices(slices, array.shape[0])])
    image = sitk.GetImageFromArray(extended)
    image.SetSpacing(source.GetSpacing())
    image.SetDirection(source.GetDirection())
    image.SetOrigin(source.TransformIndexToPhysicalPoint((x0, y0, 0)))
    folder.mkdir(parents=True, exist_ok=True)
    if input_format == "nrrd":
        path = folder / f"ct_{xy}x{xy}x{slices}.nrrd"
        sitk.WriteImage(image, str(path), True)
        return path
    if input_format != "dicom":
        raise ValueError(f"unknown input format {input_format}")
    series = folder / f"ct_{xy}x{xy}x{slices}_dicom"
    series.mkdir(exist_ok=True)
    write_dicom_series(image, series)
    return series


def write_dicom_series(image, folder: Path) -> None:
    """One CT DICOM file per slice, with positions and orientation so GDCM re-sorts them."""
    import SimpleITK as sitk

    stamp = time.strftime("%Y%m%d")
    uid_root = "1.2.826.0.1.3680043.2.1125." + str(int(time.time() * 1000) % 10**12)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    shared = {
        "0008|0060": "CT",
        "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
        "0008|0020": stamp,
        "0010|0010": "BENCHMARK^CT",
        "0010|0020": "BENCH",
        "0020|000d": uid_root + ".1",
        "0020|000e": uid_root + ".2",
        "0020|0037": orientation,
        "0018|0050": f"{image.GetSpacing()[2]:.4f}",
        "0008|103e": "benchmark CT (mirrored real slices)",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        for tag, value in shared.items():
            slice_image.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in position))
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0008|0018", f"{uid_root}.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(slice_image)


# --------------------------------------------------------------------------- worker side


def ct_spec(spacing: float, window: int):
    from Med3DFMLib.preprocess import InputSpec

    return InputSpec(modality="CT", spacing=(spacing,) * 3, window=(window,) * 3, intensity={"method": "ct", "window": [-1000, 1000]})


def get_segmenter(args: Dict[str, Any]) -> Tuple[Any, Any, List[Any], str]:
    """(network, input spec, segments, note): the bundled model's network and labels if it loads
    (always with the benchmark's CT input spec, so every run does the same work), else random weights."""
    import torch

    from Med3DFMLib.io.segmentations import SegmentInfo
    from Med3DFMLib.models import VARIANTS, SegmentationModel

    spec = ct_spec(args["spacing"], args["window"])
    reason = "no model asked for"
    if args.get("model"):
        try:
            from Med3DFMLib.segment import load_segmenter

            loaded = load_segmenter(args["model"])
            if getattr(loaded, "model", None) is None:
                raise ValueError("it is not a plain segmentation network")
            return loaded.model, spec, list(loaded.segments), f"{args['model']} (bundled weights, CT input spec of the benchmark)"
        except Exception as err:  # noqa: BLE001 - any failure falls back to random weights
            reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
    torch.manual_seed(0)
    classes = args["classes"]
    model = SegmentationModel(VARIANTS["small"], num_classes=classes).eval()
    segments = [SegmentInfo(value=i, name=f"class_{i}") for i in range(1, classes)]
    return model, spec, segments, f"random weights, {classes} classes ({reason})"


def set_threads(threads: int) -> None:
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def worker_pipeline(args: Dict[str, Any]) -> Dict[str, Any]:
    """The end-to-end job, stage by stage, in this fresh process."""
    import psutil
    import SimpleITK as sitk

    from Med3DFMLib.inference import choose_device, count_windows, predict_volume
    from Med3DFMLib.io.segmentations import write_seg_nrrd
    from Med3DFMLib.io.volumes import read_volume
    from Med3DFMLib.preprocess import probabilities_to_labels, to_model_input
    from Med3DFMLib.segment import segment_volumes_table

    set_threads(args["threads"])
    # One-off imports (MONAI's sliding window is imported lazily by `predict_volume`): every job
    # pays them once; reported apart so stage times scale with the volume alone.
    tick = time.perf_counter()
    import monai.inferers  # noqa: F401

    imports = time.perf_counter() - tick
    tick = time.perf_counter()
    model, spec, segments, model_note = get_segmenter(args)
    device = choose_device(args["device"])
    load_model = time.perf_counter() - tick

    hwm_reset = reset_peak_rss()
    rss_before = psutil.Process().memory_info().rss
    timings: Dict[str, float] = {}
    started = time.perf_counter()
    image = read_volume(args["input"])
    timings["load"] = time.perf_counter() - started
    # The stages of `segment_image` / `run_segment`, timed one by one.
    tick = time.perf_counter()
    array, grid = to_model_input(image, spec)
    timings["preprocess"] = time.perf_counter() - tick
    tick = time.perf_counter()
    probabilities = predict_volume(model, array, spec.window[::-1], device, overlap=args["overlap"])
    timings["infer"] = time.perf_counter() - tick
    tick = time.perf_counter()
    labels = probabilities_to_labels(probabilities, grid, image)
    timings["postprocess"] = time.perf_counter() - tick
    del probabilities, array
    tick = time.perf_counter()
    segment_volumes_table(labels, segments)
    out = Path(args["workdir"]) / "benchmark.seg.nrrd"
    write_seg_nrrd(out, labels, segments)
    timings["write"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    peak = peak_rss_bytes(from_status=hwm_reset) or 0
    out.unlink(missing_ok=True)

    model_shape = tuple(reversed(grid.GetSize()))  # (z, y, x)
    return {
        "model": model_note,
        "classes": int(model.num_classes),
        "input_size": list(image.GetSize()),
        "input_spacing": [round(s, 4) for s in image.GetSpacing()],
        "model_grid_zyx": list(model_shape),
        "windows": count_windows(model_shape, spec.window[::-1], args["overlap"]),
        "timings_s": timings,
        "load_model_s": load_model,
        "imports_s": imports,
        "peak_rss_bytes": int(peak),
        "peak_extra_bytes": int(peak - rss_before),
        "rss_before_bytes": int(rss_before),
        "peak_rss_reset": hwm_reset,
        "size": sitk.GetArrayViewFromImage(image).size,
    }


def _sliding(model, array, window: int, overlap: float, batch: int, device):
    """MONAI's sliding window with the settings `predict_volume` uses (autocast on CUDA as it does)."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from Med3DFMLib.inference import autocast_for

    def predictor(x):
        with autocast_for(device):
            return model(x).float().softmax(1)

    inputs = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    with torch.inference_mode():
        return sliding_window_inference(
            inputs,
            roi_size=(window,) * 3,
            sw_batch_size=batch,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(array.min()),
            sw_device=device,
            device=torch.device("cpu"),
        )


def worker_peer(args: Dict[str, Any]) -> Dict[str, Any]:
    """SwinUNETR and Med3DFM on the same resampled array (or a crop of it holding a few windows)."""
    import torch
    from monai.networks.nets import SwinUNETR

    from Med3DFMLib.inference import count_windows, predict_volume
    from Med3DFMLib.io.volumes import read_volume
    from Med3DFMLib.preprocess import to_model_input

    set_threads(args["threads"])
    device = torch.device("cuda" if args["device"] == "cuda" else "cpu")
    med, spec, _segments, _note = get_segmenter(args)
    window, overlap = args["window"], args["overlap"]
    array, _grid = to_model_input(read_volume(args["input"]), spec)
    total_windows = count_windows(array.shape, (window,) * 3, overlap)

    crop = array
    if not args["swin_full"]:
        # Keep the first few windows along x (z and y cut to one window): a real part of the scan.
        interval = max(int(window * (1 - overlap)), 1)
        width = min(array.shape[2], window + interval * (args["swin_windows"] - 1))
        crop = array[:window, :window, :width]
    crop_windows = count_windows(crop.shape, (window,) * 3, overlap)

    torch.manual_seed(0)
    classes = int(med.num_classes)  # same output channels to blend as Med3DFM
    swin = SwinUNETR(in_channels=1, out_channels=classes, feature_size=48).eval().to(device)
    results: Dict[str, Any] = {"classes": classes, "total_windows": total_windows, "measured_windows": crop_windows, "crop_zyx": list(crop.shape)}

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tick

    # Warm both (first forwards pay one-off kernel set-up), then time on the same crop.
    warm = array[:window, :window, :window]
    predict_volume(med, warm, (window,) * 3, device, overlap=overlap)
    _sliding(swin, warm, window, overlap, 1, device)
    results["med3dfm_crop_s"] = timed(lambda: predict_volume(med, crop, (window,) * 3, device, overlap=overlap))
    results["swin_crop_s"] = timed(lambda: _sliding(swin, crop, window, overlap, 1, device))
    results["swin_s_per_window"] = results["swin_crop_s"] / crop_windows
    results["med3dfm_s_per_window"] = results["med3dfm_crop_s"] / crop_windows
    results["swin_infer_s"] = results["swin_s_per_window"] * total_windows
    results["extrapolated"] = not args["swin_full"] and crop_windows < total_windows
    return results


def run_worker(payload: Dict[str, Any], timeout: float = 7200, in_process: bool = False) -> Dict[str, Any]:
    """One measurement in a fresh interpreter, or in this one with `in_process` (quick smoke runs:
    peak memory then includes what earlier runs left)."""
    if in_process:
        result = worker_peer(payload) if payload["kind"] == "peer" else worker_pipeline(payload)
        return json.loads(json.dumps(result))
    return run_in_fresh_process(Path(__file__).resolve(), payload, payload["threads"], timeout, payload["kind"])


# --------------------------------------------------------------------------- report side


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def volume_markdown(result: Dict[str, Any]) -> str:
    s = result["settings"]
    med = result["med3dfm"]
    t = med["timings_s"]
    lines = [
        f"### Whole CT, {' × '.join(str(v) for v in med['input_size'])} voxels "
        f"({' × '.join(f'{v:g}' for v in med['input_spacing'])} mm, {s['input_format']}), {s['device']}, {s['threads']} thread(s)",
        "",
        f"Model: {med['model']}; {med['classes']} output classes. Model grid {s['spacing']:g} mm: {' × '.join(str(v) for v in reversed(med['model_grid_zyx']))} voxels, "
        f"{med['windows']} windows of {s['window']}³ at overlap {s['overlap']:g}.",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {stage} | {t[stage]:.2f} |" for stage in STAGES]
    lines += [
        f"| **total** | **{t['total']:.2f}** |",
        f"| (model loading, not in total) | {med['load_model_s']:.2f} |",
        f"| (first import of MONAI's inferers, not in total) | {med['imports_s']:.2f} |",
        "",
        f"Peak RSS of the job's process: {_mib(med['peak_rss_bytes'])} MiB "
        f"({_mib(med['peak_extra_bytes'])} MiB above the {_mib(med['rss_before_bytes'])} MiB it held before reading the scan).",
        "",
    ]
    peer = result.get("peer")
    if peer:
        label = (
            f"EXTRAPOLATED from {peer['measured_windows']} of {peer['total_windows']} windows"
            if peer["extrapolated"]
            else f"measured on all {peer['total_windows']} windows"
        )
        ratio = peer["swin_s_per_window"] / peer["med3dfm_s_per_window"]
        lines += [
            "| inference on the same resampled array | s per window | whole volume, s | per-window ÷ Med3DFM |",
            "|---|---:|---:|---:|",
            f"| Med3DFM (`predict_volume`) | {peer['med3dfm_s_per_window']:.3f} | {t['infer']:.1f} (measured) | 1.00 |",
            f"| SwinUNETR (`sliding_window_inference`) | {peer['swin_s_per_window']:.3f} | {peer['swin_infer_s']:.1f} ({label}) | {ratio:.1f} |",
            "",
            f"Per-window seconds of both models come from the same crop ({' × '.join(str(v) for v in peer['crop_zyx'])} voxels, z × y × x) "
            f"with the same Gaussian blending, overlap, threads and number of output classes ({peer['classes']}); "
            "SwinUNETR one window per batch, Med3DFM with the library's memory-planned batch.",
            "",
        ]
    return "\n".join(lines)


def scaling_markdown(scaling: Dict[str, Any]) -> str:
    where = "one process for all points (smoke run)" if scaling.get("in_process") else "fresh process per point"
    lines = [f"### Med3DFM scaling (end to end, {where})", "", "Against volume size (overlap "
             f"{scaling['size_overlap']:g}):", "",
             "| input voxels | slices | windows | total s | infer s | peak RSS MiB |", "|---:|---:|---:|---:|---:|---:|"]
    for p in scaling["size"]:
        voxels = p["input_size"][0] * p["input_size"][1] * p["input_size"][2]
        lines.append(f"| {voxels / 1e6:.1f} M | {p['input_size'][2]} | {p['windows']} | {p['timings_s']['total']:.1f} | {p['timings_s']['infer']:.1f} | {_mib(p['peak_rss_bytes'])} |")
    lines += ["", f"Against overlap ({' × '.join(str(v) for v in scaling['overlap'][0]['input_size'])} voxels):", "",
              "| overlap | windows | total s | infer s | peak RSS MiB |", "|---:|---:|---:|---:|---:|"]
    for p in scaling["overlap"]:
        lines.append(f"| {p['overlap']:g} | {p['windows']} | {p['timings_s']['total']:.1f} | {p['timings_s']['infer']:.1f} | {_mib(p['peak_rss_bytes'])} |")
    if scaling.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in scaling["plots"])]
    elif scaling.get("plot_note"):
        lines += ["", scaling["plot_note"]]
    lines.append("")
    return "\n".join(lines)


def plot_scaling(scaling: Dict[str, Any], out: Path) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        scaling["plot_note"] = "(matplotlib is not installed: no plots)"
        return []
    paths = []
    for name, points, xs, xlabel in (
        ("scaling_size.png", scaling["size"], [p["input_size"][0] * p["input_size"][1] * p["input_size"][2] / 1e6 for p in scaling["size"]], "input voxels (millions)"),
        ("scaling_overlap.png", scaling["overlap"], [p["overlap"] for p in scaling["overlap"]], "sliding-window overlap"),
    ):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        for stage in ("total", "infer", "preprocess", "postprocess"):
            ax_t.plot(xs, [p["timings_s"][stage] for p in points], marker="o", label=stage)
        ax_t.set_xlabel(xlabel)
        ax_t.set_ylabel("seconds")
        ax_t.legend()
        ax_t.grid(alpha=0.3)
        ax_m.plot(xs, [p["peak_rss_bytes"] / 2**30 for p in points], marker="o", color="tab:red")
        ax_m.set_xlabel(xlabel)
        ax_m.set_ylabel("peak RSS (GiB)")
        ax_m.grid(alpha=0.3)
        fig.suptitle(f"Med3DFM end-to-end segmentation, {scaling['threads']} thread(s), {scaling['device']}")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(str(out / name))
    return paths


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the extended CT")
    parser.add_argument("--xy", type=int, default=512, help="in-plane size (centre crop of the 512×512 slices)")
    parser.add_argument("--input-format", default="dicom", choices=["dicom", "nrrd"])
    parser.add_argument("--spacing", type=float, default=1.5, help="model spacing in mm (isotropic)")
    parser.add_argument("--window", type=int, default=96, help="window edge in voxels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="hippocampus-mr-demo", help="bundled model to try first ('' = random weights)")
    parser.add_argument("--classes", type=int, default=14, help="classes of the random-weight fallback model (SwinUNETR always gets the model's number)")
    parser.add_argument("--swin-windows", type=int, default=2, help="SwinUNETR windows to time (0 = skip the peer)")
    parser.add_argument("--swin-full", action="store_true", help="run SwinUNETR on the whole volume instead of extrapolating")
    parser.add_argument("--scaling", action="store_true", help="also measure Med3DFM against volume size and overlap")
    parser.add_argument("--scaling-slices", default="50,100,200,300", help="slice counts for the size scan")
    parser.add_argument("--scaling-overlaps", default="0,0.25,0.5,0.75")
    parser.add_argument("--scaling-overlap-slices", type=int, default=60, help="slices of the volume for the overlap scan")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--in-process", action="store_true", help="no fresh process per measurement (smoke runs; memory less exact)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        payload = json.loads(args.worker)
        result = worker_peer(payload) if payload["kind"] == "peer" else worker_pipeline(payload)
        print(json.dumps(result))
        return result

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available to PyTorch")
    started = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("slices", "xy", "input_format", "spacing", "window", "overlap", "device", "threads", "model", "classes", "swin_windows", "swin_full", "in_process")}
    run = lambda payload: run_worker(payload, in_process=args.in_process)  # noqa: E731
    base = {"spacing": args.spacing, "window": args.window, "overlap": args.overlap, "device": args.device, "threads": args.threads, "model": args.model, "classes": args.classes}
    args.out.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"settings": settings}
    with tempfile.TemporaryDirectory(prefix="med3dfm_bench_") as tmp:
        tmp_path = Path(tmp)
        inputs: Dict[int, Path] = {}

        def input_for(slices: int) -> Path:
            if slices not in inputs:
                inputs[slices] = make_ct(slices, args.xy, tmp_path / "inputs", args.input_format)
            return inputs[slices]

        tick = time.perf_counter()
        path = input_for(args.slices)
        result["make_input_s"] = time.perf_counter() - tick
        result["med3dfm"] = run({"kind": "pipeline", "input": str(path), "workdir": tmp, **base})
        print(f"[bench_volume] Med3DFM end to end: {result['med3dfm']['timings_s']['total']:.1f} s", file=sys.stderr, flush=True)
        if args.swin_windows > 0 or args.swin_full:
            payload = {"kind": "peer", "input": str(path), "swin_windows": max(args.swin_windows, 1), "swin_full": args.swin_full, **base}
            result["peer"] = run(payload)
            print(f"[bench_volume] SwinUNETR peer: {result['peer']['swin_crop_s']:.1f} s", file=sys.stderr, flush=True)
        (args.out / "volume.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (args.out / "volume.md").write_text(volume_markdown(result), encoding="utf-8")
        print(volume_markdown(result))

        if args.scaling:
            scaling: Dict[str, Any] = {"in_process": args.in_process, "threads": args.threads, "device": args.device, "size_overlap": args.overlap, "size": [], "overlap": []}
            for slices in [int(v) for v in args.scaling_slices.split(",") if v.strip()]:
                point = run({"kind": "pipeline", "input": str(input_for(slices)), "workdir": tmp, **base})
                scaling["size"].append(point)
                print(f"[bench_volume] scaling {slices} slices: {point['timings_s']['total']:.1f} s", file=sys.stderr, flush=True)
            for overlap in [float(v) for v in args.scaling_overlaps.split(",") if v.strip()]:
                point = run({"kind": "pipeline", "input": str(input_for(args.scaling_overlap_slices)), "workdir": tmp, **{**base, "overlap": overlap}})
                point["overlap"] = overlap
                scaling["overlap"].append(point)
                print(f"[bench_volume] scaling overlap {overlap:g}: {point['timings_s']['total']:.1f} s", file=sys.stderr, flush=True)
            scaling["plots"] = plot_scaling(scaling, args.out)
            result["scaling"] = scaling
            (args.out / "scaling.json").write_text(json.dumps(scaling, indent=2) + "\n", encoding="utf-8")
            (args.out / "scaling.md").write_text(scaling_markdown(scaling), encoding="utf-8")
            print(scaling_markdown(scaling))
    result["wall_seconds"] = time.perf_counter() - started
    (args.out / "volume.json").write_text(json.dumps({k: v for k, v in result.items() if k != "scaling"}, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
