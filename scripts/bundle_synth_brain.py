#!/usr/bin/env python3
"""Turn a synthetic-brain training checkpoint (scripts/train_synth_brain.py) into a registry-ready
segmentation model: a safetensors file with float16 weights and its card inside (no optimiser
state), and print the registry entry (card, file size and sha256) as JSON.

    python scripts/bundle_synth_brain.py build/synth_brain/best.safetensors
    python scripts/bundle_synth_brain.py build/synth_brain/best.safetensors --out Resources/models/synth-brain-mr.safetensors

It does not touch Resources/models.json: the entry is printed for review (and for
scripts/bundle_model.py once the model has been evaluated on real scans).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from Med3DFMLib.errors import Med3DFMError  # noqa: E402
from Med3DFMLib.registry.catalogue import load_registry, schema_errors  # noqa: E402
from Med3DFMLib.synth.labels import read_labels_table  # noqa: E402
from Med3DFMLib.synth.train import INTENSITY_RULE, read_checkpoint  # noqa: E402
from Med3DFMLib.weights import sha256_of, write_weights  # noqa: E402

MAX_BYTES = 20 * 1000 * 1000
SCT = "SCT"
ANATOMY = ["SCT", "123037004", "Anatomical Structure"]
SIDES = {"left": ["SCT", "7771000", "Left"], "right": ["SCT", "24028007", "Right"]}

# FreeSurfer label -> (segment type code, FreeSurferColorLUT colour). Types are SNOMED CT from DICOM
# CID 7153 "CNS Segmentation Type" (cerebellar cortex, inferior lateral ventricle: CID 7140 "Brain
# Structure for Volumetric Measurement"); SNOMED CT has no concept for FreeSurfer's ventral
# diencephalon, for which CID 7140 uses DICOM's own code DCM 110700.
STRUCTURES: Dict[int, Tuple[List[str], Tuple[int, int, int]]] = {
    2: ([SCT, "68523003", "Cerebral white matter"], (245, 245, 245)),
    3: ([SCT, "40146001", "Cerebral cortex"], (205, 62, 78)),
    4: ([SCT, "66720007", "Lateral ventricle"], (120, 18, 134)),
    5: ([SCT, "53118009", "Inferior horn of lateral ventricle"], (196, 58, 250)),
    7: ([SCT, "33060004", "Cerebellar white matter"], (220, 248, 164)),
    8: ([SCT, "25991003", "Cerebellar cortex"], (230, 148, 34)),
    10: ([SCT, "42695009", "Thalamus"], (0, 118, 14)),
    11: ([SCT, "11000004", "Caudate nucleus"], (122, 186, 220)),
    12: ([SCT, "89278009", "Putamen"], (236, 13, 176)),
    13: ([SCT, "14738005", "Globus pallidus"], (12, 48, 255)),
    14: ([SCT, "49841001", "Third ventricle"], (204, 182, 142)),
    15: ([SCT, "35918002", "Fourth ventricle"], (42, 204, 164)),
    16: ([SCT, "119238007", "Brain stem"], (119, 159, 176)),
    17: ([SCT, "5366008", "Hippocampus"], (220, 216, 20)),
    18: ([SCT, "4958002", "Amygdala"], (103, 255, 255)),
    24: ([SCT, "65216001", "Cerebrospinal fluid"], (60, 60, 60)),
    26: ([SCT, "427667007", "Nucleus accumbens"], (255, 165, 0)),
    28: (["DCM", "110700", "Ventral Diencephalon"], (165, 42, 42)),
}
RIGHT_OF_LEFT = {2: 41, 3: 42, 4: 43, 5: 44, 7: 46, 8: 47, 10: 49, 11: 50, 12: 51, 13: 52, 17: 53, 18: 54, 26: 58, 28: 60}
RIGHT_COLOURS = {52: (13, 48, 255)}  # FreeSurferColorLUT: the only right structure coloured unlike its left


def label_entries(class_labels: List[int], names: Dict[int, str]) -> List[Dict[str, Any]]:
    """One card label per output class (value = class index, what the segment pipeline writes)."""
    left_of = {right: left for left, right in RIGHT_OF_LEFT.items()}
    entries = []
    for value, freesurfer in enumerate(class_labels):
        if freesurfer == 0:
            continue
        base = left_of.get(freesurfer, freesurfer)
        code, colour = STRUCTURES[base]
        colour = RIGHT_COLOURS.get(freesurfer, colour)
        terminology: Dict[str, Any] = {"contextName": "Segmentation category and type - DICOM master list", "category": ANATOMY, "type": code}
        name = names[freesurfer]
        side = name.split()[0]
        if side in SIDES:
            terminology["typeModifier"] = SIDES[side]
        entries.append({"value": value, "name": name, "color": [round(c / 255, 3) for c in colour], "terminology": terminology})
    return entries


def weights_licence(encoder_init: Optional[Dict[str, Any]], given: Optional[str]) -> str:
    """Fine-tuned weights carry the licence of the encoder weights they started from (the bundled
    encoder is CC-BY-SA-4.0, share-alike); a random initialisation owes only the data's Apache-2.0."""
    if given:
        return given
    if encoder_init is None:
        return "Apache-2.0"
    for entry in load_registry()["models"]:
        if entry["id"] == encoder_init["id"]:
            return str(entry["licence"])
    raise Med3DFMError(f"the initial encoder {encoder_init['id']} is not in the registry: give its licence with --licence")


def brain_domain(maps: List[Path], recipe: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    """The card's `domain`: a brain MR of any contrast, whole head or skull-stripped. The field of
    view spans the label maps' brain-only boxes (SynthSeg's 32 structures) to their whole grids (the
    head and the air around it, as a whole-head acquisition has), along L, P, S after reorienting to LPS. The intensities are not checked (the model
    was trained for any contrast; only "not CT" is): their `raw` range is that of whole-head images
    synthesised with the training recipe, for people to read. A hippocampus crop (35 x 50 x 35 mm) or
    a chest CT is refused; a scan cut to part of the brain may be too."""
    import SimpleITK as sitk

    from Med3DFMLib.domain import PERCENTILES
    from Med3DFMLib.synth import SYNTHSEG_OUTPUT_LABELS, SynthConfig, SynthGenerator, load_label_table

    extents = []
    for path in maps:
        image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
        array = sitk.GetArrayFromImage(image)
        spacing_zyx = np.array(image.GetSpacing()[::-1])
        for mask in (array > 0, np.isin(array, [v for v in SYNTHSEG_OUTPUT_LABELS if v])):
            where = np.nonzero(mask)
            extents.append([(int(w.max()) - int(w.min()) + 1) * s for w, s in zip(where, spacing_zyx)][::-1])  # L, P, S
        # the map's whole grid (air included): what a whole-head acquisition covers (256 mm at 1 mm for
        # SynthSeg's maps); the head's own box alone refused FreeSurfer's conformed 256^3 grid
        extents.append([n * s for n, s in zip(image.GetSize(), image.GetSpacing())])
    extents_mm = np.array(extents)
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()}
    generator = SynthGenerator(maps, SynthConfig(**{**settings, "crop_shape": None}), seed, table=load_label_table(maps[0].parent))
    raw = np.array([np.percentile(generator.sample()[0].numpy(), PERCENTILES) for _ in range(2 * len(maps))])
    return {
        "modality": "MR",
        "contrast": "any (trained on synthetic images of random contrast, some T1-like)",
        "body_region": "brain: whole head or skull-stripped",
        "field_of_view": {"axes": "LPS", "kind": "whole scan",
                          "extent_mm": {"min": [round(float(v), 1) for v in extents_mm.min(axis=0)],
                                        "max": [round(float(v), 1) for v in extents_mm.max(axis=0)]}},
        "intensity": {"scale": "relative", "percentiles": list(PERCENTILES),
                      "raw": {"min": [round(float(v), 4) for v in raw.min(axis=0)], "max": [round(float(v), 4) for v in raw.max(axis=0)]}},
        "measured": {"label_maps": len(maps), "synthetic_images": len(raw), "script": "scripts/bundle_synth_brain.py"},
    }


def network_text(architecture: Dict[str, Any], encoder: Optional[Dict[str, Any]]) -> str:
    """What was trained, in the card's words."""
    if architecture.get("network") == "unet":
        return f"MONAI 3D U-Net (channels {'-'.join(str(c) for c in architecture['channels'])}, no residual units) from scratch"
    return f"encoder {'initialised from ' + encoder['id'] if encoder else 'randomly initialised'} + light decoder, all trained"


def schedule_text(config: Dict[str, Any]) -> str:
    """The learning-rate schedule of the run, a closing anneal included."""
    text = f"linear warmup {config['warmup_steps']} steps, then constant"
    if config.get("anneal_to"):
        text += f", then a half cosine to 0 from step {config['anneal_from']} to step {config['anneal_to']}"
    return text


def real_scan_text(evaluation: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """The card's real-scan metrics and the sentence its limits open with, from the JSON that
    scripts/evaluate_synth_brain.py wrote for these weights."""
    real = evaluation["real_t1"]
    t1, inverted = real["T1"], real["T1, brain intensities inverted (T2-like)"]
    metrics: Dict[str, Any] = {
        "dataset": "one real skull-stripped 1 mm T1 (voxelmorph test scan, ../shared/data/brain) against its FreeSurfer aseg, "
                   "and the same scan with its brain intensities inverted; scripts/evaluate_synth_brain.py",
        "mean_dice": t1["mean_dice"], "dice": t1["per_structure"], "inverted_contrast_mean_dice": inverted["mean_dice"],
        "seconds_cpu": t1["seconds"],
    }
    peer = real.get("peer: one labelled T1 registered")
    if peer:
        metrics["registration_peer_mean_dice"] = peer["mean_dice"]
    if "mni_template" in evaluation:
        metrics["mni_template_tissue_dice"] = evaluation["mni_template"]["per_tissue"]
    text = (f"Measured on one real T1 only: mean Dice {t1['mean_dice']:.2f} over twelve structures against FreeSurfer "
            f"({inverted['mean_dice']:.2f} with the contrast inverted)"
            + (f"; one labelled head registered onto the scan scores {peer['mean_dice']:.2f}" if peer else "") + ". ")
    return metrics, text


def build_card(state: Dict[str, Any], names: Dict[int, str], model_id: str, version: str, licence: str,
               domain: Dict[str, Any], evaluation: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    config, recipe, best = state["config"], state["recipe"], state["best"]
    # the card describes the weights in this file: the validation at its own step
    final = next(v for v in state["validation"] if v["step"] == state["step"])
    spacing = float(config["spacing"])
    devices = sorted({f"{p['device']} x{p['world_size']}" for p in state["parts"]})
    hours = state["seconds"] / 3600
    training_maps, held_out = state["maps"]["training"], state["maps"]["held_out"]
    data = (f"SynthSeg's {len(training_maps)} whole-head training label maps (BBillot/SynthSeg data, Apache-2.0; Billot et al., "
            f"Medical Image Analysis 2023), {len(held_out)} more held apart for validation ({', '.join(held_out)}); "
            "no real images: every training image was synthesised from a label map")
    encoder = state["encoder_init"]
    method = (f"the SynthSeg recipe: images synthesised on the fly (random affine and elastic deformation, random per-class "
              f"Gaussian contrast or T1 priors, bias field, resolution and slice-thickness simulation, noise, gamma, skull "
              f"stripping) at {spacing:g} mm in {config['crop']}^3 crops; {network_text(state['architecture'], encoder)}; "
              f"cross-entropy + soft Dice, AdamW lr {config['lr']:g} ({schedule_text(config)}), "
              f"batch {config['batch']} per process; {state['step']} steps in {hours:.2f} h on {', '.join(devices)}; "
              f"weights of step {state['step']} (best validation Dice of the run: step {best['step']})")
    limits = ("Trained and validated on synthetic images only: not yet evaluated on real scans. ", "")
    if evaluation is not None:
        limits = real_scan_text(evaluation)[1], " SynthSeg's own network (GPU-trained at 1 mm) scores 0.85-0.88 on real T1 test sets."
    card = {
        "id": model_id,
        "version": version,
        "task": "segment",
        "title": "Brain structures (MR, any contrast), learned from synthetic images",
        "description": "Segments SynthSeg's 32 brain structures (cerebral white matter and cortex, ventricles, deep grey nuclei, "
                       "hippocampus, amygdala, cerebellum, brain stem, CSF, ...) on a whole-head or skull-stripped brain MR. "
                       "Not for clinical use.",
        "licence": licence,
        "architecture": state["architecture"],
        "domain": domain,
        "input": {"modality": "MR", "spacing": [spacing] * 3, "window": [int(config["crop"])] * 3,
                  "intensity": dict(INTENSITY_RULE), "orientation": "LPS"},
        "labels": label_entries(state["class_labels"], names),
        "training": {
            "data": data,
            "method": method,
            "script": "scripts/train_synth_brain.py",
            "steps": state["step"],
            "seconds": state["seconds"],
            "devices": devices,
            "parts": state["parts"],
            "training_maps": training_maps,
            "held_out_maps": held_out,
            "recipe": recipe,
            "config": config,
            "encoder_init": encoder,
            "class_labels": state["class_labels"],
            "class_labels_note": "output class i is the FreeSurfer label class_labels[i]",
            "validation_history": [{"step": v["step"], "dice": v["dice"]} for v in state["validation"]],
            "loss_curve": state["history"][:: max(1, len(state["history"]) // 100)],
        },
        "metrics": {
            "dataset": f"synthetic whole-head images of the held-out maps {', '.join(held_out)} "
                       f"({config['val_images_per_map']} per map, fixed seed {config['val_seed']}, the training recipe at {spacing:g} mm)",
            "protocol": "Gaussian-blended sliding window over the whole head (Med3DFMLib.inference.predict_volume), "
                        "Dice per structure with left and right averaged, mean over the images",
            "step": state["step"],
            "dice": final["per_structure"],
            "mean_dice": final["dice"],
        },
        "limits": limits[0] + f"Works at {spacing:g} mm, so thin structures (cortex, pallidum, inferior lateral ventricles) "
                  "lose detail. Expects a brain MR (whole head or skull-stripped); other anatomy, a crop of part of the brain "
                  "and CT are outside its training." + limits[1] + " Not for clinical use.",
    }
    if evaluation is not None:
        card["metrics"] = {"synthetic_validation": card["metrics"], "real_t1": real_scan_text(evaluation)[0],
                           "mean_dice": evaluation["real_t1"]["T1"]["mean_dice"]}
    return card


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, nargs="?", default=ROOT / "build" / "synth_brain" / "best.safetensors")
    parser.add_argument("--out", type=Path, help="model file (default: <id>.safetensors beside the checkpoint)")
    parser.add_argument("--id", default="synth-brain-mr")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--licence", help="SPDX id of the weights (default: that of the initial encoder)")
    parser.add_argument("--evaluation", type=Path, help="the JSON scripts/evaluate_synth_brain.py wrote for these weights: "
                        "its real-scan Dice goes into the card's metrics and limits (for a registry entry)")
    parser.add_argument("--maps", type=Path, help="folder with SynthSeg's labels_table.txt (default: the run's maps, else Testing/Data/synthseg)")
    args = parser.parse_args(argv)

    try:
        evaluation = None
        if args.evaluation is not None:
            try:
                evaluation = json.loads(args.evaluation.read_text(encoding="utf-8"))
                evaluation["real_t1"]["T1"]["mean_dice"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise Med3DFMError(f"--evaluation {args.evaluation}: not an evaluate_synth_brain.py result ({err})") from None
        weights, _moments, state = read_checkpoint(args.checkpoint)
        if evaluation is not None and evaluation.get("model", {}).get("steps") != state["step"]:
            raise Med3DFMError(f"--evaluation {args.evaluation} scored the weights of step {evaluation.get('model', {}).get('steps')}, "
                               f"{args.checkpoint} holds step {state['step']}")
        if not state["best"] or not any(v["step"] == state["step"] for v in state["validation"]):
            raise Med3DFMError(f"{args.checkpoint} has no validation at its step {state['step']} (a run stopped by a signal skips it): "
                               "bundle best.safetensors, or resume for a few steps and let it stop by its budget")
        folders = [args.maps] if args.maps else [Path(state["config"]["maps"]), ROOT / "Testing" / "Data" / "synthseg"]
        table = next((f / "labels_table.txt" for f in folders if (f / "labels_table.txt").is_file()), None)
        if table is None:
            raise Med3DFMError(f"no labels_table.txt in {', '.join(str(f) for f in folders)}: give --maps")
        maps = sorted(table.parent.glob("training_seg_*.nii.gz"))
        if not maps:
            raise Med3DFMError(f"no training_seg_*.nii.gz label maps beside {table}: the domain is measured on them")
        card = build_card(state, read_labels_table(table), args.id, args.version, weights_licence(state["encoder_init"], args.licence),
                          brain_domain(maps, state["recipe"]), evaluation)
        out = args.out or args.checkpoint.with_name(f"{args.id}.safetensors")
        # float16 halves the file (the small model is ~20 MB in float32); the loader casts back
        sha = write_weights(out, {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, card)
    except Med3DFMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = out.stat().st_size
    if size > MAX_BYTES:
        print(f"error: {out} is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB a bundled model may have", file=sys.stderr)
        return 2
    entry = {key: value for key, value in card.items() if key != "architecture"}
    entry["files"] = [{"name": out.name, "sha256": sha, "size": size, "urls": [], "bundled": f"models/{out.name}"}]
    problems = schema_errors({"schema_version": 1, "models": [entry]})
    if problems:
        print("error: the entry would not validate: " + "; ".join(problems), file=sys.stderr)
        return 2
    print(json.dumps(entry, indent=2))
    print(f"wrote {out} ({size / 1e6:.1f} MB, sha256 {sha[:12]}...); Resources/models.json not changed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
