#!/usr/bin/env python3
"""Manage Med3DFM models from a source checkout, without installing the package.

    python setup_models.py list [--json]
    python setup_models.py download ID...
    python setup_models.py verify [ID...]
    python setup_models.py import PATH...
    python setup_models.py remove ID...

Options: --registry PATH, --progress json|tqdm|none. Same commands as `med3dfm models ...`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from Med3DFMLib.registry.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="setup_models.py"))
