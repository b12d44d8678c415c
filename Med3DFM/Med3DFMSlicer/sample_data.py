"""The self-test's sample in Slicer's Sample Data module: a hippocampus MR crop shipped with the extension
(a local file, checked by SHA-256: nothing is downloaded), its reference labels, and a CT outside the
demo model's domain."""

import logging
from pathlib import Path
from typing import Tuple

from Med3DFMSupport import environment

MODULE_DIR = Path(__file__).resolve().parent.parent  # the folder of Med3DFM.py
SAMPLE_NAME = "Med3DFMHippocampusMR"
SAMPLE_SHA256 = {
    "hippocampus_014.nii.gz": "cb4d85b584f170d404578beb0eeeb018ee3f961db7dbc247c9ac49381bfad456",
}


def sampleFiles() -> Tuple[Path, Path]:
    """The self-test case shipped with the extension: (MR image, reference labels)."""
    root = environment.library_root(MODULE_DIR)
    folder = root / "Testing" / "Data" / "hippocampus"
    return folder / "images" / "hippocampus_014.nii.gz", folder / "labels" / "hippocampus_014.nii.gz"


def sampleCT() -> Path:
    """A small abdominal CT shipped for the self-test: outside the demo model's domain."""
    return environment.library_root(MODULE_DIR) / "Testing" / "Data" / "totalseg" / "example_ct_sm.nii.gz"


def registerSampleData() -> None:
    """Register the shipped hippocampus MR crop in the Sample Data module (a local file: nothing is downloaded)."""
    import SampleData

    image, _labels = sampleFiles()
    if not image.is_file():
        logging.warning(f"Med3DFM sample data not found: {image}")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Med3DFM",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "Med3DFM.png"),
        uris=image.as_uri(),
        fileNames="Med3DFMHippocampus014.nii.gz",
        checksums="SHA256:" + SAMPLE_SHA256[image.name],
        nodeNames="HippocampusMR",
    )
