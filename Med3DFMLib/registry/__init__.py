"""Model registry: which models exist, where their weights are, and getting them safely.

Resolution order for a model id: a copy bundled with Med3DFM, then the user cache
(`models_home()`), then a download from the registry's mirrors, always checked against the
registry's sha256. Nothing here touches the network at import time.
"""

from Med3DFMLib.registry.cache import models_home
from Med3DFMLib.registry.catalogue import default_registry_path, load_registry
from Med3DFMLib.registry.manage import (
    FileCheck,
    RemoveResult,
    import_model,
    list_models,
    remove_model,
    verify_model,
    verify_models,
)
from Med3DFMLib.registry.resolve import ResolvedModel, check_adapter_encoder, resolve_model

__all__ = [
    "FileCheck",
    "RemoveResult",
    "ResolvedModel",
    "check_adapter_encoder",
    "default_registry_path",
    "import_model",
    "list_models",
    "load_registry",
    "models_home",
    "remove_model",
    "resolve_model",
    "verify_model",
    "verify_models",
]
