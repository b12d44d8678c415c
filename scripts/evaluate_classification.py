"""Evaluate classification adapters and their heatmaps against baselines, through the real pipeline.

1. AdrenalMNIST3D (64³ binary shape masks, written as .nii.gz with 1 mm spacing): adapters trained
   on 10, 20, 50 scans per class (five draws each) and on the whole train split, scored on the val
   split (AUROC; accuracy and ECE of the calibrated probabilities adjusted to the train split's
   prevalence, as a user would give it with --prevalence; the adapter's own cross-validated AUROC
   and held-out ECE on train). Baselines on the same splits: logistic regression on block-averaged
   masks with the block size and C chosen by cross-validation on the training set, a MONAI
   ResNet-10 from scratch given the adapter's CPU time (encoder features + training) and 5x it,
   and the published MedMNIST v2 AUC.
2. Lesion present / absent: crops that contain a lesion vs crops elsewhere in the same scans
   (pyradiomics brain1/2 tumour, breast1 lesion, three DeepLesion CT lesions), leave-one-scan-out,
   with and without the lesion masks as auxiliary pixel-level supervision; heatmaps on held-out
   positive crops: pointing game and mass inside the lesion vs random and centre baselines, and
   the two sanity checks of Adebayo et al. (2018): re-drawn weights and permuted labels.

Writes docs/classification_eval.json and the ROC / reliability plots; MED3DFM_HOME is a temporary
folder so the user's cache is never touched.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
PUBLISHED_MEDMNIST_AUC = 0.839  # MedMNIST v2, AdrenalMNIST3D, best reported AUC (28³ input)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _metrics(probabilities: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    from Med3DFMLib.classify.train import expected_calibration_error, macro_auroc

    return {"auroc": round(macro_auroc(probabilities, labels), 4), "accuracy": round(float((probabilities.argmax(1) == labels).mean()), 4), "ece": round(expected_calibration_error(probabilities, labels), 4)}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(1, keepdims=True)


def score_adapter(model: Path, images: Sequence[Path], rois: Sequence[Any] = ()) -> Tuple[np.ndarray, float, Any]:
    """Raw logits of every scan, the card's temperature, and the loaded classifier."""
    from Med3DFMLib.classify.job import Classifier
    from Med3DFMLib.io.volumes import read_volume

    classifier = Classifier.load(str(model), device_name="cpu")
    logits = []
    for index, image in enumerate(images):
        prepared = classifier.prepare(read_volume(image), rois[index] if rois else None)
        logits.append(classifier.predict(prepared).logits)
    return np.array(logits), classifier.temperature, classifier


# ---------------------------------------------------------------- AdrenalMNIST3D
def adrenal(work: Path, draws: int, settings: Sequence[int], resnet_draws: int, resnet_all: bool = True, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """`previous`: the adrenal part of an earlier run. When given, the whole-train-split adapter is not
    learned again (its entry, summary and curves are kept), the few-shot draws are charged the
    per-scan feature time measured by that run, and a draw that trains no ResNet here keeps the
    ResNet results that run had for the same setting and draw (marked as carried over)."""
    import SimpleITK as sitk
    from Med3DFMLib.classify.data import read_list
    from Med3DFMLib.classify.job import run_adapt_classify, run_classify
    from Med3DFMLib.classify.train import adjusted_for_prevalence

    archive = np.load(DATA / "adrenal" / "adrenalmnist3d_64_trainval.npz")
    names = ["normal", "mass"]
    folder = work / "adrenal"
    folder.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, List[Path]] = {}
    for split in ("train", "val"):
        paths[split] = []
        for index, volume in enumerate(archive[f"{split}_images"]):
            path = folder / f"{split}_{index:04d}.nii.gz"
            if not path.exists():
                image = sitk.GetImageFromArray(volume)
                image.SetSpacing((1.0, 1.0, 1.0))  # the archive has no spacing: 1 mm assumed
                sitk.WriteImage(image, str(path), True)
            paths[split].append(path)
    y_train = archive["train_labels"].ravel().astype(int)
    y_val = archive["val_labels"].ravel().astype(int)
    # The deployment prevalence a user would give: the train split's, never the val split's.
    deployment = np.bincount(y_train, minlength=2) / len(y_train)
    val_csv = _write_csv(folder / "val.csv", ["image"], [[p.name] for p in paths["val"]])

    results: Dict[str, Any] = {"train": int(len(y_train)), "val": int(len(y_val)), "val_per_class": np.bincount(y_val).tolist(),
                               "deployment_prevalence_mass": round(float(deployment[1]), 4), "settings": {}}
    plans: List[Tuple[str, int, np.ndarray]] = [] if previous else [("all", 0, np.arange(len(y_train)))]
    for per_class in settings:
        for draw in range(draws):
            rng = np.random.default_rng(1000 * per_class + draw)
            chosen = np.concatenate([rng.choice(np.nonzero(y_train == c)[0], per_class, replace=False) for c in (0, 1)])
            plans.append((f"{per_class}", draw, chosen))
    feature_seconds: Dict[int, float] = {}
    if previous:
        whole = previous["settings"]["all"][0]
        per_scan = (whole["seconds_wall"] - whole["train_seconds"]) / whole["n_train"]
        feature_seconds = {i: per_scan for i in range(len(y_train))}
        results["feature_seconds_per_scan_from_previous_run"] = round(per_scan, 3)
    curves: Dict[str, Any] = {}
    for setting, draw, chosen in plans:
        csv_path = _write_csv(folder / f"train_{setting}_{draw}.csv", ["image", "class"], [[paths["train"][i].name, names[y_train[i]]] for i in chosen])
        model = folder / f"adrenal_{setting}_{draw}.safetensors"
        tick = time.perf_counter()
        if model.is_file() and model.with_suffix(".json").is_file():  # a resumed run: this adapter was learned already
            record = json.loads(model.with_suffix(".json").read_text())
            wall = record["timings_s"]["total"]
        else:
            record = run_adapt_classify(read_list(csv_path, True), "adrenal mass", model, seed=draw)
            wall = time.perf_counter() - tick
        if setting == "all":
            per_scan = record["timings_s"]["features"] / len(chosen)
            for i in chosen:
                feature_seconds[int(i)] = per_scan
        # CPU cost as if the features (both views) were computed now (the few-shot draws reuse the cache).
        cost = sum(feature_seconds.get(int(i), 0.0) for i in chosen) + record["timings_s"]["train"]
        logits, temperature, _ = score_adapter(model, paths["val"])
        raw, scaled = _softmax(logits), _softmax(logits / temperature)
        training_prior = np.bincount(y_train[chosen], minlength=2) / len(chosen)
        shifted = adjusted_for_prevalence(scaled, training_prior, deployment)
        entry = {
            "draw": draw,
            "n_train": int(len(chosen)),
            "seconds_wall": round(wall, 1),
            "seconds_cpu_equivalent": round(cost, 1),
            "train_seconds": record["timings_s"]["train"],
            "temperature": temperature,
            "calibrated": record["calibration"]["calibrated"],
            "out_of_fold": record["training"]["out_of_fold"],
            "steps": record["training"]["steps"],
            "parameters": record["adapter"]["parameters"],
            "before": _metrics(raw, y_val),
            "after": _metrics(scaled, y_val),
            "at_deployment_prevalence": _metrics(shifted, y_val),
        }
        first = setting == "all" or draw == 0
        if first:
            curves[f"adapter {setting}"] = shifted[:, 1].tolist()
            if setting == "all":
                curves["reliability_raw"] = raw.tolist()
                curves["reliability_scaled"] = shifted.tolist()
                run_classify(read_list(val_csv, False), str(model), folder / "val_results.tsv", prevalence={"mass": float(deployment[1])})  # the real `classify --list` path
        baselines: Dict[str, Any] = {"logistic_regression": tuned_logistic(archive["train_images"][chosen], y_train[chosen], archive["val_images"], y_val, curves if first else None, setting)}
        if draw < resnet_draws:
            budgets = ([1] if resnet_all else []) if setting == "all" else [1, 5]  # 5x the all-scans budget is about two hours here
            for factor in budgets:
                baselines[f"resnet10_{factor}x"] = resnet_baseline(archive["train_images"][chosen], y_train[chosen], archive["val_images"], y_val, factor * cost, draw, curves if first else None, f"{setting} {factor}x")
        if previous and draw >= resnet_draws:
            for earlier in previous["settings"].get(setting, []):
                if earlier["draw"] == draw:
                    baselines.update({k: {**v, "carried_over": "from the previous run of this evaluation (same draw; its budget was that run's adapter cost)"}
                                      for k, v in earlier["baselines"].items() if k.startswith("resnet")})
        entry["baselines"] = baselines
        results["settings"].setdefault(setting, []).append(entry)
        print(json.dumps({"adrenal": setting, "draw": draw, "adapter": entry["at_deployment_prevalence"], "oof": entry["out_of_fold"], "lr": baselines["logistic_regression"],
                          "resnet": {k: v for k, v in baselines.items() if k.startswith("resnet")}, "s": entry["seconds_wall"]}), flush=True)
    if previous:
        results["settings"] = {"all": previous["settings"]["all"], **results["settings"]}
        curves.update({k: v for k, v in previous["curves"].items() if k in ("adapter all", "reliability_raw", "reliability_scaled") or k.endswith(" all") or " all " in k})
        results["all_from_previous_run"] = True
    results["summary"] = {}
    for setting, entries in results["settings"].items():
        def agg(get, rows=entries) -> Dict[str, float]:
            values = np.array([get(e) for e in rows], dtype=float)
            return {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4), "n": int(len(values))}

        summary = {
            "draws": len(entries),
            "adapter_auroc": agg(lambda e: e["after"]["auroc"]),
            "adapter_accuracy": agg(lambda e: e["at_deployment_prevalence"]["accuracy"]),
            "adapter_ece": agg(lambda e: e["at_deployment_prevalence"]["ece"]),
            "ece_before": agg(lambda e: e["before"]["ece"]),
            "ece_after": agg(lambda e: e["after"]["ece"]),
            "adapter_oof_auroc": agg(lambda e: e["out_of_fold"]["auroc"]),
            "adapter_oof_ece_held_out": agg(lambda e: e["out_of_fold"]["ece_held_out"]),
            "lr_auroc": agg(lambda e: e["baselines"]["logistic_regression"]["auroc"]),
            "lr_accuracy": agg(lambda e: e["baselines"]["logistic_regression"]["accuracy"]),
            "lr_ece": agg(lambda e: e["baselines"]["logistic_regression"]["ece"]),
            "lr_cv_auroc": agg(lambda e: e["baselines"]["logistic_regression"]["cv_auroc"]),
            "adapter_wins": int(sum(e["after"]["auroc"] >= e["baselines"]["logistic_regression"]["auroc"] for e in entries)),
        }
        for key in ("resnet10_1x", "resnet10_5x"):
            rows = [e for e in entries if key in e["baselines"]]
            if rows:
                summary[f"{key}_auroc"] = agg(lambda e, key=key: e["baselines"][key]["auroc"], rows)
        results["summary"][setting] = summary
    results["published_medmnist_auc"] = PUBLISHED_MEDMNIST_AUC
    results["labels_val"] = y_val.tolist()
    results["curves"] = curves
    return results


def _blocks(volumes: np.ndarray, block: int) -> np.ndarray:
    n, d, h, w = volumes.shape
    x = volumes.astype(np.float32) / 255.0
    return x.reshape(n, d // block, block, h // block, block, w // block, block).mean(axis=(2, 4, 6)).reshape(n, -1)


LR_BLOCKS = (2, 4, 8, 16)
LR_C = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def tuned_logistic(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, curves: Any, setting: str) -> Dict[str, Any]:
    """Logistic regression on block-averaged masks, block size and C chosen by stratified
    cross-validation (AUROC) on the training set only, then refitted on all of it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(int(min(5, np.bincount(train_y).min())), shuffle=True, random_state=0)
    best = (-1.0, 0, 0.0)
    for block in LR_BLOCKS:
        features = _blocks(train_x, block)
        for c in LR_C:
            score = float(np.mean(cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)), features, train_y, cv=folds, scoring="roc_auc")))
            best = max(best, (score, block, c))
    score, block, c = best
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(_blocks(train_x, block), train_y)
    probabilities = model.predict_proba(_blocks(val_x, block))
    if curves is not None:
        curves[f"logistic regression {setting}"] = probabilities[:, 1].tolist()
    return {**_metrics(probabilities, val_y), "block": block, "C": c, "cv_auroc": round(score, 4)}


def resnet_baseline(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seconds: float, seed: int, curves: Any, setting: str) -> Dict[str, Any]:
    """MONAI ResNet-10 from scratch on the 64³ masks (random flips), stopped after `seconds` of CPU time."""
    import torch
    import torch.nn.functional as F
    from monai.networks.nets import resnet10

    torch.manual_seed(seed)
    model = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.from_numpy(train_x.astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(train_y).long()
    generator = torch.Generator().manual_seed(seed)
    started, steps = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - started < seconds:
        chosen = torch.randint(0, len(x), (min(16, len(x)),), generator=generator)
        batch = x[chosen]
        for axis in (-1, -2, -3):
            if torch.rand(1, generator=generator) < 0.5:
                batch = batch.flip(axis)
        loss = F.cross_entropy(model(batch), y[chosen])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(val_x[i : i + 16].astype(np.float32) / 255.0)[:, None]) for i in range(0, len(val_x), 16)])
    probabilities = logits.softmax(1).numpy()
    if curves is not None:
        curves[f"resnet10 {setting}"] = probabilities[:, 1].tolist()
    return {**_metrics(probabilities, val_y), "steps": steps, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------- lesion present / absent
LESION_SCANS = [
    ("brain1", "pyradiomics/brain1_image.nrrd", "pyradiomics/brain1_label.nrrd"),
    ("brain2", "pyradiomics/brain2_image.nrrd", "pyradiomics/brain2_label.nrrd"),
    ("breast1", "pyradiomics/breast1_image.nrrd", "pyradiomics/breast1_label.nrrd"),
    ("deeplesion1", "deeplesion/CT_Lesion_000001_02_01_008-023_img.nii.gz", "deeplesion/CT_Lesion_000001_02_01_008-023_gt.nii.gz"),
    ("deeplesion2", "deeplesion/CT_Lesion_000002_03_01_035-047_img.nii.gz", "deeplesion/CT_Lesion_000002_03_01_035-047_gt.nii.gz"),
    ("deeplesion9", "deeplesion/CT_Lesion_000009_03_01_036-048_img.nii.gz", "deeplesion/CT_Lesion_000009_03_01_036-048_gt.nii.gz"),
]


def make_crops(work: Path, per_class: int, side_mm: float = 40.0) -> List[Dict[str, Any]]:
    """Crops (image + lesion mask, geometry kept) with the lesion somewhere inside, and without."""
    import SimpleITK as sitk

    crops = []
    for scan, image_name, label_name in LESION_SCANS:
        image = sitk.ReadImage(str(DATA / image_name))
        labels = sitk.ReadImage(str(DATA / label_name))
        mask = sitk.GetArrayFromImage(labels) > 0  # (z, y, x)
        pixels = sitk.GetArrayViewFromImage(image)
        spacing = np.array(image.GetSpacing())[::-1]
        size = np.minimum(np.maximum(np.round(side_mm / spacing).astype(int), 4), mask.shape)
        rng = np.random.default_rng(abs(hash(scan)) % 2**32 if False else len(crops) + 7)
        lesion = np.argwhere(mask)
        made = {1: 0, 0: 0}
        attempts = 0
        while min(made.values()) < per_class and attempts < 5000:
            attempts += 1
            want = 1 if made[1] < per_class else 0
            if want == 1:
                centre = lesion[rng.integers(len(lesion))]
                offset = (rng.uniform(0.2, 0.8, 3) * size).astype(int)
                start = np.clip(centre - offset, 0, np.array(mask.shape) - size)
            else:
                start = np.array([rng.integers(0, s - c + 1) for s, c in zip(mask.shape, size)])
            region = tuple(slice(a, a + c) for a, c in zip(start, size))
            inside = mask[region]
            if want == 1 and inside.sum() < 5 or want == 0 and inside.any():
                continue
            if float(np.ptp(pixels[region])) == 0.0:  # blank padding of a slab: the pipeline refuses constant scans
                continue
            index = [int(v) for v in start[::-1]]
            extent = [int(v) for v in size[::-1]]
            crop_image = sitk.RegionOfInterest(image, extent, index)
            crop_mask = sitk.RegionOfInterest(sitk.Cast(labels > 0, sitk.sitkUInt8), extent, index)
            name = f"{scan}_{'pos' if want else 'neg'}{made[want]}"
            sitk.WriteImage(crop_image, str(work / f"{name}.nrrd"), True)
            sitk.WriteImage(crop_mask, str(work / f"{name}_mask.nrrd"), True)
            crops.append({"scan": scan, "name": name, "label": want, "image": work / f"{name}.nrrd", "mask": work / f"{name}_mask.nrrd", "fraction": float(inside.mean())})
            made[want] += 1
    return crops


def _pointing(heat: np.ndarray, lesion: np.ndarray) -> Tuple[float, float]:
    """(hit: the hottest voxel lies in the lesion, share of the map's mass inside the lesion)."""
    top = np.unravel_index(int(np.argmax(heat)), heat.shape)
    total = float(heat.sum())
    return float(lesion[top]), float((heat * lesion).sum() / total) if total > 0 else float(lesion.mean())


def _centre_map(shape: Sequence[int]) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(s) - (s - 1) / 2) / max(s / 4, 1) for s in shape], indexing="ij")
    return np.exp(-0.5 * sum(g**2 for g in grids))


def randomised_weights(adapter: Any) -> Any:
    """A copy of the adapter with every learned weight re-drawn (channel statistics kept)."""
    import copy

    import torch

    other = copy.deepcopy(adapter)
    torch.manual_seed(1)
    for member in other.members:
        for module in member.modules():
            if module is not member and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        with torch.no_grad():
            member.queries.normal_(0, 0.02)
            member.read_weight.normal_(0, member.read_weight.shape[1] ** -0.5)
    return other.eval()


def lesions(work: Path, per_class: int, occlusion_limit: int) -> Dict[str, Any]:
    import SimpleITK as sitk
    import torch
    from Med3DFMLib.classify.data import read_list
    from Med3DFMLib.classify.job import Classifier, run_adapt_classify
    from Med3DFMLib.explain.classification import classification_heatmap
    from Med3DFMLib.explain.heatmaps import to_input_grid
    from Med3DFMLib.io.volumes import read_volume

    folder = work / "lesions"
    folder.mkdir(parents=True, exist_ok=True)
    crops = make_crops(folder, per_class)
    scans = [s for s, _, _ in LESION_SCANS]
    results: Dict[str, Any] = {"crops": len(crops), "per_scan_and_class": per_class, "variants": {}}
    for variant in ("no_aux", "aux_masks"):
        scores, labels, heat_rows = [], [], []
        for held in scans:
            train = [c for c in crops if c["scan"] != held]
            rows = [[c["image"].name, "lesion" if c["label"] else "no lesion"] + ([c["mask"].name if c["label"] else ""] if variant == "aux_masks" else []) for c in train]
            header = ["image", "class"] + (["mask"] if variant == "aux_masks" else [])
            csv_path = _write_csv(folder / f"train_{variant}_{held}.csv", header, rows)
            model = folder / f"lesion_{variant}_{held}.safetensors"
            run_adapt_classify(read_list(csv_path, True), "lesion present", model, seed=0)
            classifier = Classifier.load(str(model), device_name="cpu")
            lesion_index = classifier.class_index("lesion")
            # The label-randomisation check: the same crops, their classes permuted.
            shuffled = np.random.default_rng(len(held)).permutation([r[1] for r in rows])
            permuted_csv = _write_csv(folder / f"train_{variant}_{held}_permuted.csv", header, [[r[0], c, *r[2:]] for r, c in zip(rows, shuffled)])
            permuted_model = folder / f"lesion_{variant}_{held}_permuted.safetensors"
            run_adapt_classify(read_list(permuted_csv, True), "lesion present", permuted_model, seed=0)
            permuted = Classifier.load(str(permuted_model), device_name="cpu")
            test = [c for c in crops if c["scan"] == held]
            occluded = 0
            for crop in test:
                image = read_volume(crop["image"])
                prepared = classifier.prepare(image)
                prediction = classifier.predict(prepared)
                scores.append(float(prediction.probabilities[lesion_index]))
                labels.append(crop["label"])
                if not crop["label"]:
                    continue
                lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(crop["mask"]))) > 0
                row: Dict[str, Any] = {"crop": crop["name"], "fraction": crop["fraction"]}
                methods = ["attention", "gradcam"] + (["occlusion"] if occluded < occlusion_limit else [])
                occluded += "occlusion" in methods
                for method in methods:
                    on_grid, _ = classification_heatmap(classifier, prepared, method, lesion_index)
                    heat = sitk.GetArrayFromImage(to_input_grid(on_grid, prepared.scan.grid, image))
                    row[method] = _pointing(heat, lesion)
                    if method in ("attention", "gradcam"):
                        # Sanity checks (Adebayo et al. 2018): the same map from the adapter with
                        # re-drawn weights, and from an adapter trained on permuted labels.
                        for check in ("random", "labels"):
                            if check == "labels":
                                other_grid, _ = classification_heatmap(permuted, prepared, method, permuted.class_index("lesion"))
                            else:
                                kept, classifier.adapter = classifier.adapter, randomised_weights(classifier.adapter)
                                try:
                                    other_grid, _ = classification_heatmap(classifier, prepared, method, lesion_index)
                                finally:
                                    classifier.adapter = kept
                            other_heat = sitk.GetArrayFromImage(to_input_grid(other_grid, prepared.scan.grid, image))
                            a, b = heat.ravel(), other_heat.ravel()
                            row[f"{method}_{check}_correlation"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
                            row[f"{method}_{check}"] = _pointing(other_heat, lesion)
                row["centre"] = _pointing(_centre_map(lesion.shape), lesion)
                row["random"] = (float(lesion.mean()), float(lesion.mean()))  # expectation of a random point / uniform map
                heat_rows.append(row)
        from Med3DFMLib.classify.train import auroc

        scores_arr, labels_arr = np.array(scores), np.array(labels)
        summary: Dict[str, Any] = {"auroc": round(auroc(scores_arr, labels_arr == 1), 4), "accuracy": round(float(((scores_arr > 0.5) == (labels_arr == 1)).mean()), 4), "heatmaps": {}}
        for key in ("attention", "gradcam", "occlusion", "centre", "random", "attention_random", "gradcam_random", "attention_labels", "gradcam_labels"):
            values = [r[key] for r in heat_rows if key in r]
            if values:
                summary["heatmaps"][key] = {"n": len(values), "pointing": round(float(np.mean([v[0] for v in values])), 3), "mass_inside": round(float(np.mean([v[1] for v in values])), 3)}
        for key in ("attention_random_correlation", "gradcam_random_correlation", "attention_labels_correlation", "gradcam_labels_correlation"):
            values = [r[key] for r in heat_rows if key in r]
            summary[key] = round(float(np.mean(values)), 3) if values else None
        results["variants"][variant] = {"summary": summary, "rows": heat_rows}
        print(json.dumps({"lesions": variant, **{k: v for k, v in summary.items()}}), flush=True)
    return results


def plots(adrenal_results: Dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.array(adrenal_results["labels_val"])
    curves = adrenal_results["curves"]
    figure, axis = plt.subplots(figsize=(5.5, 5))
    palette = plt.get_cmap("tab20").colors
    named = [n for n in curves if not n.startswith("reliability")]
    for index, name in enumerate(named):
        scores = curves[name]
        scores = np.array(scores)
        thresholds = np.unique(scores)[::-1]
        tpr = [0.0] + [float(((scores >= t) & (labels == 1)).sum() / (labels == 1).sum()) for t in thresholds]
        fpr = [0.0] + [float(((scores >= t) & (labels == 0)).sum() / (labels == 0).sum()) for t in thresholds]
        from Med3DFMLib.classify.train import auroc

        axis.plot(fpr, tpr, label=f"{name} (AUROC {auroc(scores, labels == 1):.3f})", linestyle="-" if name.startswith("adapter") else "--", color=palette[index % len(palette)], linewidth=2 if name.startswith("adapter") else 1)
    axis.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("AdrenalMNIST3D val (98 scans): ROC")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "classification_eval_roc.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 5))
    for key, label in (("reliability_raw", "before temperature scaling"), ("reliability_scaled", "after temperature scaling")):
        probabilities = np.array(curves[key])
        confidence = probabilities.max(1)
        correct = probabilities.argmax(1) == labels
        edges = np.linspace(0.5, 1.0, 6)
        xs, ys = [], []
        for low, high in zip(edges[:-1], edges[1:]):
            inside = (confidence >= low) & (confidence <= high)
            if inside.any():
                xs.append(confidence[inside].mean())
                ys.append(correct[inside].mean())
        axis.plot(xs, ys, marker="o", label=label)
    axis.plot([0.5, 1], [0.5, 1], color="grey", linewidth=0.5, label="perfect calibration")
    axis.set_xlabel("confidence (top-class probability)")
    axis.set_ylabel("accuracy")
    axis.set_title("Reliability, adapter trained on all 1,188")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "classification_eval_reliability.png", dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--settings", type=int, nargs="*", default=[10, 20, 50])
    parser.add_argument("--resnet-draws", type=int, default=1, help="draws per setting that also train the ResNet-10 baseline (same CPU time as the adapter, and 5x it)")
    parser.add_argument("--no-resnet-all", action="store_true", help="no ResNet-10 on the whole train split (its budget, the adapter's, is about 25 CPU-minutes)")
    parser.add_argument("--keep-all", action="store_true", help="keep the whole-train-split results of the existing docs/classification_eval.json (its adapter takes about 40 CPU-minutes) and run only the few-shot settings")
    parser.add_argument("--skip-lesions", action="store_true")
    parser.add_argument("--lesion-crops", type=int, default=8, help="crops per scan and class")
    parser.add_argument("--occlusion", type=int, default=2, help="occlusion maps per held-out scan (slow)")
    parser.add_argument("--skip-adrenal", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="med3dfm_cls_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MED3DFM_HOME"] = str(work / "home")
    started = time.perf_counter()
    results: Dict[str, Any] = {"threads": args.threads, "spacing_note": "AdrenalMNIST3D has no spacing: volumes written with 1 mm spacing"}
    if not args.skip_adrenal:
        previous = None
        if args.keep_all:
            existing = args.out / "classification_eval.json"
            previous = json.loads(existing.read_text())["adrenal"] if existing.is_file() else None
            if previous is None or "all" not in previous.get("settings", {}):
                parser.error(f"--keep-all needs the whole-train-split results in {existing}")
        results["adrenal"] = adrenal(work, args.draws, args.settings, args.resnet_draws, not args.no_resnet_all, previous)
        plots(results["adrenal"], args.out)
    if not args.skip_lesions:
        results["lesions"] = lesions(work, args.lesion_crops, args.occlusion)
    results["seconds"] = round(time.perf_counter() - started, 1)
    # A run of one part (--skip-adrenal / --skip-lesions) keeps the other part of the existing file.
    path = args.out / "classification_eval.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    seconds = merged.get("seconds") if isinstance(merged.get("seconds"), dict) else {}
    merged.update({k: v for k, v in results.items() if k != "seconds"})
    merged["seconds"] = {**seconds, **{part: results["seconds"] for part in ("adrenal", "lesions") if part in results}}
    path.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"done in {results['seconds']:.0f} s; work folder {work}")


if __name__ == "__main__":
    main()
