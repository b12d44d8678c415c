#!/usr/bin/env python3
"""Measure the domain of the bundled models from their training data and put it into their cards.

The numbers of a card's `domain` (field of view, intensity percentiles; Med3DFMLib/domain.py) are
measured here from the scans each model was trained on, never typed in:

* hippocampus-mr-demo: the 144 training cases of the fixed split of
  scripts/train_hippocampus_demo.py (MSD Task04 hippocampus crops, T1-weighted MR);
* med3dfm-encoder-small: the scans its pretraining archive was built from: every scan under the
  shared data folder that the archive builder takes (label maps skipped the same way) plus slicerio's
  CTChest4 (214 scans).

    python scripts/measure_domain.py            # print both domains as JSON
    python scripts/measure_domain.py --write    # also write them into Resources/models.json and the
                                                # card inside the demo's weight file (sha256 and size updated)

The encoder's weight file keeps its card unchanged: every adapter trained on it names the encoder's
sha256, so rewriting the file would orphan them. Its domain lives in the registry entry, which is the
card that `resolve_model` hands out for a registry id.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_hippocampus_demo import MODEL_ID as DEMO_ID  # noqa: E402  (scripts/ is on sys.path when run)
from train_hippocampus_demo import split_cases  # noqa: E402

from Med3DFMLib.domain import ScanFacts, domain_from_scans, measure_image  # noqa: E402

ENCODER_ID = "med3dfm-encoder-small"
SHARED = ROOT.parent / "shared" / "data"
SCRIPT = "scripts/measure_domain.py"


def demo_domain(data: Path) -> Dict[str, Any]:
    """The domain of hippocampus-mr-demo: its training split of the MSD hippocampus crops."""
    from Med3DFMLib.io.volumes import read_volume

    names = sorted(p.name for p in (data / "images").glob("*.nii.gz"))
    train = split_cases(names)["train"]
    scans = [measure_image(read_volume(data / "images" / name)) for name in train]
    return domain_from_scans(
        scans,
        modality="MR",  # the NIfTI files carry no DICOM tag; the data set is MR and the voxels show no CT air
        contrast="T1",
        body_region="brain: medial temporal lobe, a crop centred on one hippocampus",
        fov_kind="crop",
        measured={"script": SCRIPT, "data": f"MSD Task04 Hippocampus, the {len(train)} training cases of scripts/train_hippocampus_demo.py"},
    )


def encoder_scans(shared: Path) -> List[ScanFacts]:
    """Facts of the scans the encoder's pretraining archive was built from (Med3DFMLib/pretrain/data.py)."""
    import SimpleITK as sitk
    import slicerio

    from Med3DFMLib.io.volumes import read_volume
    from Med3DFMLib.pretrain.data import _looks_like_labels, find_volumes

    # synthseg/ holds label maps only (no scans) and joined the shared data after the pretraining run.
    paths = [p for p in find_volumes(shared) if "synthseg" not in p.relative_to(shared).parts]
    paths.append(Path(slicerio.get_testdata_file("CTChest4.nrrd")))
    scans = []
    for path in paths:
        image = read_volume(path, kind="labels")  # as the archive builder reads them
        if not _looks_like_labels(sitk.GetArrayViewFromImage(image)):
            scans.append(measure_image(image))
    return scans


def encoder_domain(shared: Path) -> Dict[str, Any]:
    scans = encoder_scans(shared)
    return domain_from_scans(
        scans,
        modality="any",
        body_region="any: pretrained on brain MR crops (200 of the scans), abdominal and chest CT and MR, head CT, breast MR and a T1 brain",
        fov_kind="mixed",
        measured={"script": SCRIPT, "data": "the scans of the project's shared data that its pretraining archive holds, and slicerio's CTChest4"},
    )


def margin_report(data: Path) -> str:
    """The measurement behind domain.RELATIVE_MARGIN: how far apart the relative intensity profiles of
    two hippocampus crops lie, and how far the breast MR crop of Testing/Data lies from all of them."""
    import numpy as np

    from Med3DFMLib.domain import RELATIVE_MARGIN
    from Med3DFMLib.io.volumes import read_volume

    crops = np.array([measure_image(read_volume(p)).relative_percentiles() for p in sorted((data / "images").glob("*.nii.gz"))])
    pairs = np.abs(crops[:, None, :] - crops[None, :, :]).max(axis=-1)[np.triu_indices(len(crops), 1)]
    breast = np.array(measure_image(read_volume(ROOT / "Testing" / "Data" / "pyradiomics" / "breast1_image.nrrd")).relative_percentiles())
    nearest = float(np.abs(crops - breast).max(axis=-1).min())
    return (f"relative profiles of {len(crops)} hippocampus crops: {100 * np.mean(pairs <= RELATIVE_MARGIN):.1f} % of the pairs within "
            f"{RELATIVE_MARGIN} (largest difference {pairs.max():.3f}); the breast MR crop is {nearest:.3f} from the nearest crop")


def write(domains: Dict[str, Dict[str, Any]]) -> None:
    """Domains into Resources/models.json; the demo's into its weight file's card too (new sha256 and size)."""
    from Med3DFMLib.weights import read_weights, sha256_of, write_weights

    registry_path = ROOT / "Resources" / "models.json"
    registry = json.loads(registry_path.read_text(encoding="utf-8"))
    for entry in registry["models"]:
        if entry["id"] in domains:
            entry["domain"] = domains[entry["id"]]
    demo = next(e for e in registry["models"] if e["id"] == DEMO_ID)
    weights = ROOT / "Resources" / demo["files"][0]["bundled"]
    tensors, card = read_weights(weights)
    card["domain"] = domains[DEMO_ID]
    write_weights(weights, tensors, card)
    demo["files"][0].update({"sha256": sha256_of(weights), "size": weights.stat().st_size})
    registry_path.write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    print(f"wrote the domains into {registry_path} and {weights}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--write", action="store_true", help="write the domains into the cards")
    args = parser.parse_args()
    domains = {DEMO_ID: demo_domain(args.data / "hippocampus"), ENCODER_ID: encoder_domain(args.data)}
    print(json.dumps(domains, indent=2))
    print(margin_report(args.data / "hippocampus"), file=sys.stderr)
    if args.write:
        write(domains)


if __name__ == "__main__":
    main()
