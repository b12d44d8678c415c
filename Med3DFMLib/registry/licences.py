"""Licences that restrict use: acknowledged once per model before its first use, and remembered.

A model card's `licence` (an SPDX-style id such as CC-BY-NC-4.0) or its `use_restrictions` text may
limit what the model may be used for (non-commercial, research only). Such a model does not run until
the user has acknowledged its licence once: `--accept-licence` on the command line, a dialog in
Slicer. The acknowledgement is kept per model id and licence text in MED3DFM_HOME/licences.json (a
changed licence asks again). Torch-free: the Slicer panel checks it before starting a job.

segment, classify, explain and adapt all check it (require_for): the model they run and, for an adapter
(or for adapt, which trains one), the encoder it runs on, whose licence governs what is made with it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import write_text_atomic
from Med3DFMLib.registry.cache import models_home

FILE = "licences.json"
# Patterns (on the upper-cased licence id or text) that restrict use, and what they mean for the user.
_RESTRICTING = ((re.compile(r"(^|[^A-Z])NC([^A-Z]|$)"), "non-commercial use only"),
                (re.compile(r"NON[- ]?COMMERCIAL"), "non-commercial use only"),
                (re.compile(r"RESEARCH[- ]?(USE[- ]?)?ONLY|FOR RESEARCH"), "research use only"),
                (re.compile(r"ACADEMIC"), "academic use only"))


def restriction(card: Mapping[str, Any]) -> Optional[str]:
    """What the model's licence restricts ("non-commercial use only", ...), or None if nothing."""
    explicit = card.get("use_restrictions")
    if explicit:
        return str(explicit)
    licence = str(card.get("licence") or card.get("license") or "").upper()
    for pattern, meaning in _RESTRICTING:
        if pattern.search(licence):
            return meaning
    return None


def _path(home: Optional[Path]) -> Path:
    return (home or models_home()) / FILE


def _read(home: Optional[Path]) -> Dict[str, Any]:
    path = _path(home)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable: ask again rather than run unacknowledged
    return data if isinstance(data, dict) else {}


def _key(card: Mapping[str, Any]) -> str:
    return str(card.get("id", ""))


def _terms(card: Mapping[str, Any]) -> str:
    return f"{card.get('licence') or card.get('license') or ''} | {card.get('use_restrictions') or ''}"


def is_acknowledged(card: Mapping[str, Any], home: Optional[Path] = None) -> bool:
    """True when the model's use is unrestricted or its current licence was acknowledged."""
    if restriction(card) is None:
        return True
    entry = _read(home).get(_key(card))
    return isinstance(entry, dict) and entry.get("terms") == _terms(card)


def acknowledge(card: Mapping[str, Any], home: Optional[Path] = None, by: str = "command line") -> None:
    """Remember that the user accepted the model's licence (atomically; other models' entries kept)."""
    data = _read(home)
    data[_key(card)] = {"terms": _terms(card), "restriction": restriction(card), "accepted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": by}
    path = _path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def require(card: Mapping[str, Any], accept: bool = False, home: Optional[Path] = None) -> Optional[str]:
    """Before a restricted model runs: pass if acknowledged, record the acknowledgement with `accept`,
    else refuse in one line. Returns the restriction (None for an unrestricted model)."""
    limit = restriction(card)
    if limit is None or is_acknowledged(card, home):
        return limit
    if not accept:
        raise Med3DFMError(f"{card.get('id')} is licensed {card.get('licence') or card.get('license') or 'with restrictions'} ({limit}): read its terms "
                           "(med3dfm models list), then run again with --accept-licence to acknowledge them (remembered for this model)")
    acknowledge(card, home)
    return limit


def _card_of(spec: str, registry: Optional[str]) -> Optional[Dict[str, Any]]:
    """The card of a model file or of the newest known id@version; None for an id no registry or cache knows
    (the job itself then says so)."""
    from Med3DFMLib.registry.resolve import looks_like_path, newest_entry

    if looks_like_path(spec):
        from Med3DFMLib.weights import read_card

        card = read_card(Path(spec).expanduser())
        return {"id": card.get("id") or Path(spec).stem, **card}
    try:
        return dict(newest_entry(spec, registry))
    except Med3DFMError:
        return None


def cards_for(spec: str, registry: Optional[str] = None, encoder: bool = False) -> List[Dict[str, Any]]:
    """The cards whose licences running `spec` is bound by: the model's, and for an adapter the encoder's
    it names. `encoder`: `spec` is an encoder that adapt trains on (its card alone)."""
    card = _card_of(str(spec).strip(), registry)
    if card is None:
        return []
    cards = [card]
    named = card.get("encoder") if not encoder else None
    if isinstance(named, dict) and named.get("id"):
        version = f"@{named['version']}" if named.get("version") else ""
        found = _card_of(f"{named['id']}{version}", registry)
        if found is not None:
            cards.append(found)
    return cards


def require_for(spec: str, accept: bool = False, registry: Optional[str] = None, encoder: bool = False,
                home: Optional[Path] = None) -> List[str]:
    """require() for every card of cards_for(spec): classify, explain and adapt call it before any work.
    Returns the restrictions that apply (for the job record)."""
    limits = [require(card, accept, home) for card in cards_for(spec, registry, encoder)]
    return [limit for limit in limits if limit is not None]
