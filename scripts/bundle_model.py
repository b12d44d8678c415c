#!/usr/bin/env python3
"""Bundle a weight file into the repository: copy it to Resources/models/ and write its entry in
Resources/models.json from the card inside the file (replacing an entry with the same id).

    python scripts/bundle_model.py build/run/encoder.safetensors --title "..." --licence CC-BY-SA-4.0 \
        --data "what it was trained on" --method "how" [--limits "..."] [--metrics metrics.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Med3DFMLib.registry.catalogue import schema_errors  # noqa: E402
from Med3DFMLib.weights import read_weights, sha256_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--title", required=True)
    parser.add_argument("--description", default="")
    parser.add_argument("--licence", required=True)
    parser.add_argument("--data", required=True, help="training data, one sentence")
    parser.add_argument("--method", required=True, help="training method, one sentence")
    parser.add_argument("--limits", default=None)
    parser.add_argument("--metrics", type=Path, help="JSON file with measured metrics")
    args = parser.parse_args()

    _, card = read_weights(args.weights)
    target = ROOT / "Resources" / "models" / f"{card['id']}.safetensors"
    if args.weights.resolve() != target.resolve():
        shutil.copyfile(args.weights, target)
    entry = {
        "id": card["id"],
        "version": card["version"],
        "task": card["task"],
        "title": args.title,
        "description": args.description,
        "licence": args.licence,
        "files": [{"name": target.name, "sha256": sha256_of(target), "size": target.stat().st_size, "urls": [], "bundled": f"models/{target.name}"}],
        "input": card["input"],
        "training": {"data": args.data, "method": args.method, **{k: v for k, v in card.get("training", {}).items() if k not in ("data", "method")}},
        "metrics": json.loads(args.metrics.read_text()) if args.metrics else card.get("metrics", {}),
    }
    for key in ("labels", "encoder"):
        if key in card:
            entry[key] = card[key]
    if args.limits:
        entry["limits"] = args.limits
    registry_path = ROOT / "Resources" / "models.json"
    registry = json.loads(registry_path.read_text())
    registry["models"] = [m for m in registry["models"] if m["id"] != entry["id"]] + [entry]
    problems = schema_errors(registry)
    if problems:
        raise SystemExit("registry would not validate: " + "; ".join(problems))
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    print(f"bundled {target.relative_to(ROOT)} ({entry['files'][0]['size'] / 1e6:.1f} MB, sha256 {entry['files'][0]['sha256'][:12]}...)")


if __name__ == "__main__":
    main()
