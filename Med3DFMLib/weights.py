"""Weight files: safetensors only, each carrying its model card in the file's metadata.

A weight file is self-describing: `read_weights` returns the tensors and the card (JSON stored
under the metadata key `med3dfm.card`), so `--model some.safetensors` needs no registry entry.
Pickle-based formats are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Tuple

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import PathLike, atomic_path

if TYPE_CHECKING:  # torch is imported only when tensors are read or written, so hashing stays quick
    import torch

CARD_KEY = "med3dfm.card"
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weight files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file, without loading its tensors. Refuses a missing
    file, pickle-based formats and anything that is not safetensors with a clear message."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise Med3DFMError(f"model file not found: {path}")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise Med3DFMError(
            f"refusing to load {path.name}: only .safetensors weight files are accepted "
            "(pickle-based formats can run code when loaded)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise Med3DFMError(f"not a valid safetensors weight file: {path} ({err})") from None


def load_tensors(path: PathLike) -> Dict[str, "torch.Tensor"]:
    """Every tensor of a safetensors file; a damaged file (e.g. truncated) is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise Med3DFMError(f"not a valid safetensors weight file: {path} ({err})") from None


def read_card(path: PathLike) -> Dict[str, Any]:
    """The model card of a safetensors weight file, without loading its tensors.

    Refuses pickle-based formats and files without a card with a clear message.
    """
    path = Path(path)
    card_text = safetensors_metadata(path).get(CARD_KEY)
    if card_text is None:
        raise Med3DFMError(f"{path.name} is a safetensors file but carries no Med3DFM model card")
    try:
        return json.loads(card_text)
    except json.JSONDecodeError as err:
        raise Med3DFMError(f"the model card inside {path.name} is not valid JSON ({err})") from None


def read_weights(path: PathLike) -> Tuple[Dict[str, "torch.Tensor"], Dict[str, Any]]:
    """Load tensors and card from a safetensors file; refuse anything else with a clear message."""
    card = read_card(path)
    return load_tensors(path), card


def write_weights(path: PathLike, tensors: Dict[str, "torch.Tensor"], card: Dict[str, Any]) -> str:
    """Write tensors + card atomically; return the file's sha256."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={CARD_KEY: json.dumps(card, sort_keys=True)})
    return sha256_of(path)
