"""Segment terminology: the coded meaning of a segment (e.g. SNOMED CT "Hippocampus"), in the two forms
Slicer uses.

A model card or registry label holds it as slicerio's dict (`category`, `type`, optional
`typeModifier`, `anatomicRegion`, `anatomicRegionModifier`, each a `[scheme, value, meaning]` code,
plus the context names); a segment in Slicer carries it as the `TerminologyEntry` tag string. The
`.seg.nrrd` writer, the Slicer module and the few-shot adapters all convert through here, so a
segment's terminology reads back the same whichever way it travelled. Pure Python: the Slicer module
imports it before any package is installed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# The context names Slicer's terminology widget needs to find an entry, when a card leaves them out.
SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


def complete_terminology(terminology: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy with the context names filled in where the entry has none (missing or empty)."""
    entry = dict(terminology)
    entry["contextName"] = entry.get("contextName") or SLICER_ANATOMY_CONTEXT
    entry["anatomicContextName"] = entry.get("anatomicContextName") or DICOM_ANATOMY_CONTEXT
    return entry


def _code(triple: Optional[Sequence[str]]) -> str:
    values = list(triple or ("", "", ""))
    values += [""] * (3 - len(values))
    return "^".join(str(v) for v in values[:3])


def terminology_string(terminology: Optional[Mapping[str, Any]]) -> str:
    """A card's terminology as Slicer's `TerminologyEntry` tag string ("" when it has none).

    Seven `~`-separated fields: context ~ category ~ type ~ type modifier ~ anatomic context ~ region ~
    region modifier; each code is `scheme^value^meaning`.
    """
    if not terminology:
        return ""
    entry = complete_terminology(terminology)
    fields = [
        str(entry["contextName"]),
        _code(entry.get("category")),
        _code(entry.get("type")),
        _code(entry.get("typeModifier")),
        str(entry["anatomicContextName"]),
        _code(entry.get("anatomicRegion")),
        _code(entry.get("anatomicRegionModifier")),
    ]
    return "~".join(fields)


def terminology_from_string(text: str) -> Optional[Dict[str, Any]]:
    """A `TerminologyEntry` tag string as slicerio's dict; None when empty or not a 7-field entry with a
    category and a type."""
    if not text:
        return None
    fields = text.split("~")
    if len(fields) != 7:
        return None

    def code(field_text: str) -> Optional[List[str]]:
        parts = (field_text.split("^") + ["", "", ""])[:3]
        return parts if any(parts) else None

    entry: Dict[str, Any] = {"contextName": fields[0]}
    category, kind = code(fields[1]), code(fields[2])
    if category is None or kind is None:
        return None
    entry["category"], entry["type"] = category, kind
    if code(fields[3]):
        entry["typeModifier"] = code(fields[3])
    if fields[4]:
        entry["anatomicContextName"] = fields[4]
    if code(fields[5]):
        entry["anatomicRegion"] = code(fields[5])
        if code(fields[6]):
            entry["anatomicRegionModifier"] = code(fields[6])
    return entry


def terminology_codes(text: str) -> Optional[Tuple[Tuple[str, str], ...]]:
    """The coded part of a `TerminologyEntry` string: (scheme, value) of category, type, type modifier,
    anatomic region and region modifier; context names and code meanings left out. None when empty.

    Two entries with the same codes are the same structure: Slicer's own comparison
    (vtkSlicerTerminologiesModuleLogic::AreTerminologyEntriesEqual, exact match of scheme and value).
    A string that is not 7 `~` fields is compared as it is.
    """
    text = (text or "").strip()
    if not text:
        return None
    fields = text.split("~")
    if len(fields) != 7:
        return (("", text),)
    codes = []
    for index in (1, 2, 3, 5, 6):
        parts = (fields[index].split("^") + ["", ""])[:2]
        codes.append((parts[0].strip(), parts[1].strip()))
    return tuple(codes)


def standard_name(terminology: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The segment name a terminology gives: its type's code meaning, then its type modifier's
    ("Kidney" + "Left" → "Kidney Left"), as SlicerTotalSegmentator names segments when its terminology
    file has no Slicer label. None without a type."""
    if not terminology or not terminology.get("type"):
        return None
    kind = list(terminology["type"]) + ["", "", ""]
    name = str(kind[2] or kind[1]).strip()
    modifier = list(terminology.get("typeModifier") or ()) + ["", "", ""]
    if str(modifier[2]).strip():
        name = f"{name} {str(modifier[2]).strip()}"
    return name or None


def segment_names(labels: Sequence[Mapping[str, Any]], raw: bool = False) -> List[str]:
    """The names a model's segments get, in the order of `labels` (card entries with name and terminology).

    By default the terminology's standard name (standard_name), as SlicerTotalSegmentator's "Use
    standard segment names"; `raw` keeps the card's names. A label keeps its card name also when it has
    no terminology type, or when another label of the model would get the same standard name (two
    labels coded as one structure, e.g. anterior and posterior hippocampus: the codes cannot tell them
    apart, so a shared name would lose what the card says).
    """
    card = [str(label["name"]) for label in labels]
    if raw:
        return card
    standard = [standard_name(label.get("terminology")) for label in labels]
    counts: Dict[str, int] = {}
    for name in standard:
        if name is not None:
            counts[name.casefold()] = counts.get(name.casefold(), 0) + 1
    return [name if name is not None and counts[name.casefold()] == 1 else raw_name for name, raw_name in zip(standard, card)]
