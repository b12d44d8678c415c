"""MRML nodes in and out: a volume node to a job's input file, a job's result files to segmentation,
table and heatmap nodes, placed where the user expects them (under the input's transform, in its
study). What to do with the segments is decided in Med3DFMSupport.results; this file only applies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import slicer
import vtk

from Med3DFMSupport import results

# Heatmaps: a perceptually ordered colour table that Slicer ships; near-zero values are left transparent.
HEATMAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
HEATMAP_OPACITY = 0.5
HEATMAP_LOWER_THRESHOLD = 0.05
# Confidence: our own colour table (red where the model was least sure, yellow up to the flag
# threshold); voxels at or above the threshold are not drawn, so only the places to check show.
CONFIDENCE_COLOR_NODE_NAME = "Med3DFM confidence"
CONFIDENCE_OPACITY = 0.6


# --- volumes ---------------------------------------------------------------------------------------

def writeVolume(volumeNode, path: Path) -> None:
    """Write a volume without changing the node's own storage (its file name stays the user's)."""
    storageNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storageNode.SetFileName(str(path))
        storageNode.UseCompressionOff()
        if not storageNode.WriteData(volumeNode):
            raise RuntimeError(f"could not write {volumeNode.GetName()} to {path}")
    finally:
        storageNode.UnRegister(None)


def ijkToRasArray(volumeNode):
    """The volume's IJK→RAS matrix as a 4×4 numpy array."""
    import numpy as np

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volumeKey(volumeNode) -> Optional[Tuple[Any, ...]]:
    """Changes whenever the volume's voxels or geometry do (the domain facts are measured again then)."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        return None
    return (volumeNode.GetID(), volumeNode.GetImageData().GetMTime(), *ijkToRasArray(volumeNode).ravel())


def dicomModality(volumeNode) -> str:
    """The DICOM Modality of the volume's Subject Hierarchy item ("" when it was not loaded from DICOM)."""
    shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
    return shNode.GetItemAttribute(shNode.GetItemByDataNode(volumeNode),
                                   slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName())


# --- where results go ------------------------------------------------------------------------------

def forgetTemporaryFile(node) -> None:
    """A node read from a job folder (deleted afterwards) must not keep pointing at it: without its
    storage node, Save Data proposes a new file (as Slicer's SampleData module does)."""
    storageNode = node.GetStorageNode()
    if storageNode is not None:
        slicer.mrmlScene.RemoveNode(storageNode)
        node.SetAndObserveStorageNodeID(None)


def placeUnderInputTransform(volumeNode, node) -> None:
    """A result read from a job file is in the volume's own (local) frame, as the job saw the volume:
    under the volume's parent transform (not hardened) it lines up with the volume wherever that is."""
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())


def placeBesideInput(volumeNode, nodes) -> None:
    """Put the outputs in the input's study (its parent in the Subject Hierarchy)."""
    shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
    parent = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
    if not parent:
        return
    for node in nodes:
        if node is not None:
            shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)


def tagProvenance(node, record: str, model: Optional[str] = None) -> None:
    """The job record (JSON) and the model (`id@version`) as node attributes, read back with GetAttribute."""
    node.SetAttribute(results.PROVENANCE_ATTRIBUTE, record)
    if model is not None:
        node.SetAttribute(results.MODEL_ATTRIBUTE, model)


# --- segments --------------------------------------------------------------------------------------

def segmentIds(segmentation) -> List[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def segmentTerminology(segment) -> str:
    """A segment's `TerminologyEntry` tag ("" when it has none)."""
    getter = getattr(segment, "GetTerminology", None)
    if getter is not None:
        return getter() or ""
    value = vtk.reference("")  # vtkSegment::GetTag(tag, std::string& value)
    if segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value):
        return str(value)
    return ""


def applySegmentDisplay(segmentationNode, display: Sequence["results.SegmentDisplay"]) -> None:
    """Names, colours and terminology as the registry says (the .seg.nrrd normally carries them already)."""
    segmentation = segmentationNode.GetSegmentation()
    for index, info in enumerate(display):
        if index >= segmentation.GetNumberOfSegments():
            break
        segment = segmentation.GetNthSegment(index)
        if segment.GetName() != info.name:
            segment.SetName(info.name)
        if any(abs(a - b) > 1e-3 for a, b in zip(segment.GetColor(), info.color)):
            segment.SetColor(*info.color)
        if info.terminology and segmentTerminology(segment) != info.terminology:
            segment.SetTag("TerminologyEntry", info.terminology)


def copySegmentProperties(source, segment) -> None:
    """Name, colour and (where the result has one) terminology of a result segment onto the segment it replaced."""
    if segment.GetName() != source.GetName():
        segment.SetName(source.GetName())
    if any(abs(a - b) > 1e-6 for a, b in zip(segment.GetColor(), source.GetColor())):
        segment.SetColor(*source.GetColor())
    terminology = segmentTerminology(source)
    if terminology and segmentTerminology(segment) != terminology:
        segment.SetTag("TerminologyEntry", terminology)


def addSegmentCopy(source, sourceId: str, segmentationNode) -> List[str]:
    """Copy one segment of `source` (a vtkSegmentation) into the node; the IDs it added."""
    target = segmentationNode.GetSegmentation()
    before = set(segmentIds(target))
    # The copy keeps the source ID unless the node has one already; then Slicer makes it unique.
    if not target.CopySegmentFromSegmentation(source, sourceId):
        raise RuntimeError(f"could not add the segment '{source.GetSegment(sourceId).GetName()}' to {segmentationNode.GetName()}")
    return [i for i in segmentIds(target) if i not in before]


def mergeResultSegments(resultNode, segmentationNode, volumeNode) -> "results.SegmentMerge":
    """Put the segments of `resultNode` into the user's `segmentationNode` without touching anything else.

    A result segment replaces the segment of the same name (case-insensitive) whose terminology
    agrees where both have one (results.plan_segment_merge): that segment keeps its ID, its place in
    the list and its display settings; its voxels, name, colour and terminology become the
    result's. Other result segments are added. Every other segment keeps its ID, name, colour,
    tags and voxels. Returns what was replaced, added and kept.
    """
    source = resultNode.GetSegmentation()
    target = segmentationNode.GetSegmentation()
    sourceIds = segmentIds(source)
    existing = [(segmentId, target.GetSegment(segmentId).GetName(), segmentTerminology(target.GetSegment(segmentId)))
                for segmentId in segmentIds(target)]
    plan = results.plan_segment_merge([(source.GetSegment(i).GetName(), segmentTerminology(source.GetSegment(i))) for i in sourceIds], existing)
    # Overlaps: a replaced segment gets a labelmap of its own (updateSegmentBinaryLabelmapFromArray
    # imports it as a new layer after clearing only that segment) and an added one keeps its own
    # copy (CopySegmentFromSegmentation), so where the result overlaps a kept segment both keep
    # their voxels: Slicer's default, segments may overlap in a multi-layer segmentation. Nothing is
    # erased from a kept segment.
    # Replacements first: if Slicer refuses one (e.g. a node whose source representation is not a
    # binary labelmap), nothing has been added yet.
    targetIds: Dict[str, str] = {}
    for sourceId, update in zip(sourceIds, plan):
        if update.target_id is None:
            continue
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(resultNode, sourceId, volumeNode)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, update.target_id, volumeNode)
        copySegmentProperties(source.GetSegment(sourceId), target.GetSegment(update.target_id))
        targetIds[sourceId] = update.target_id
    for sourceId, update in zip(sourceIds, plan):
        if update.target_id is None:
            targetIds[sourceId] = addSegmentCopy(source, sourceId, segmentationNode)[0]
    changed = set(targetIds.values())
    return results.SegmentMerge(
        replaced=[u.result_name for u in plan if u.target_id is not None],
        added=[u.result_name for u in plan if u.target_id is None],
        kept=[name for segmentId, name, _terminology in existing if segmentId not in changed],
        segment_ids=[targetIds[i] for i in sourceIds])


def applyLearnedSegments(output: Path, volumeNode, segmentationNode, structures: List[str]) -> "results.SegmentMerge":
    """Replace the painted structures (matched by name) with the full result; add any that are missing.

    Only the voxels of a replaced segment change (its ID, name, colour and terminology are the
    user's). Background and every other segment of the node are left as they are; overlaps are
    kept as in mergeResultSegments. Returns what was replaced, added and kept.
    """
    loaded = slicer.util.loadSegmentation(str(output))  # raises if it cannot
    placeUnderInputTransform(volumeNode, loaded)
    try:
        source = loaded.GetSegmentation()
        sourceIds = {source.GetNthSegment(i).GetName(): source.GetNthSegmentID(i) for i in range(source.GetNumberOfSegments())}
        target = segmentationNode.GetSegmentation()
        existing = {target.GetNthSegmentID(i): target.GetNthSegment(i).GetName() for i in range(target.GetNumberOfSegments())}
        report = results.SegmentMerge()
        for update in results.segments_to_update(list(sourceIds), existing, structures):
            sourceId = sourceIds[update.result_name]
            if update.target_id is None:
                report.segment_ids += addSegmentCopy(source, sourceId, segmentationNode)
                report.added.append(update.result_name)
            else:
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(loaded, sourceId, volumeNode)
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, update.target_id, volumeNode)
                report.segment_ids.append(update.target_id)
                report.replaced.append(existing[update.target_id])
        report.kept = [name for segmentId, name in existing.items() if segmentId not in report.segment_ids]
    finally:
        slicer.mrmlScene.RemoveNode(loaded)
    segmentationNode.CreateDefaultDisplayNodes()
    return report


def learnedSegmentIds(segmentationNode, segmentIds: Optional[List[str]] = None) -> List[str]:
    """The segments to learn from: the given ids, else every segment visible in the views.

    Hidden segments (e.g. finished structures from an earlier run) are neither learned nor changed.
    """
    segmentation = segmentationNode.GetSegmentation()
    allIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if segmentIds is not None:
        unknown = [i for i in segmentIds if i not in allIds]
        if unknown:
            raise ValueError(f"no segment with id {unknown[0]} in {segmentationNode.GetName()}")
        return [i for i in allIds if i in segmentIds]
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is None:
        return allIds
    return [i for i in allIds if displayNode.GetSegmentVisibility(i)]


def paintedSegments(volumeNode, segmentationNode, segmentIds: Optional[List[str]] = None) -> List["results.PaintedSegment"]:
    """The segments to learn from, each as a mask on the volume's grid (Slicer resamples if needed)."""
    import numpy as np

    segmentation = segmentationNode.GetSegmentation()
    painted = []
    for segmentId in learnedSegmentIds(segmentationNode, segmentIds):
        segment = segmentation.GetSegment(segmentId)
        mask = np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)) > 0
        painted.append(results.PaintedSegment(segmentId, segment.GetName(), tuple(segment.GetColor()), segmentTerminology(segment), mask))
    return painted


# --- tables and heatmaps ---------------------------------------------------------------------------

def tableFromColumns(name: str, columns: List[Tuple[str, List[Any]]]):
    """A new table node; integer, real and text columns keep their types."""
    tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for columnName, cells in columns:
        if all(isinstance(c, int) for c in cells):
            array = vtk.vtkIntArray()
        elif all(isinstance(c, (int, float)) for c in cells):
            array = vtk.vtkDoubleArray()
        else:
            array = vtk.vtkStringArray()
            cells = [str(c) for c in cells]
        array.SetName(columnName)
        for cell in cells:
            array.InsertNextValue(cell)
        tableNode.AddColumn(array)
    tableNode.Modified()
    return tableNode


def loadTable(segmentResult: "results.SegmentResult", name: str):
    """A table node from the job's .tsv, with the model id and version on every row."""
    _comments, columns, rows = results.read_tsv(segmentResult.table)
    header = ["model", "model version"] + columns
    values = [[segmentResult.model_id, segmentResult.model_version] + row for row in rows]
    return tableFromColumns(name, [(column, [row[index] for row in values]) for index, column in enumerate(header)])


def loadOverlay(path: Path, volumeNode, name: str, colorNodeId: str, lower: float, upper: float, opacity: float):
    """Load a 0..1 map (heatmap, confidence) as a scalar volume over its input: the colour table,
    a fixed 0..1 range, only the values in [lower, upper] drawn, at `opacity` in the slice views."""
    overlayNode = slicer.util.loadVolume(str(path), {"name": name, "show": False})  # raises if it cannot
    forgetTemporaryFile(overlayNode)
    placeUnderInputTransform(volumeNode, overlayNode)
    displayNode = overlayNode.GetDisplayNode()
    if displayNode is None:
        overlayNode.CreateDefaultDisplayNodes()
        displayNode = overlayNode.GetDisplayNode()
    displayNode.SetAndObserveColorNodeID(colorNodeId)
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevelMinMax(0.0, 1.0)
    displayNode.SetThreshold(float(lower), float(upper))
    displayNode.ApplyThresholdOn()
    slicer.util.setSliceViewerLayers(background=volumeNode, foreground=overlayNode, foregroundOpacity=opacity)
    return overlayNode


def loadHeatmap(heatmap: "results.HeatmapResult", volumeNode, name: str):
    """A heatmap over its input: perceptual colour map, near-zero values transparent, half opacity;
    its JSON note attached as provenance."""
    heatmapNode = loadOverlay(heatmap.path, volumeNode, name, HEATMAP_COLOR_NODE_ID, HEATMAP_LOWER_THRESHOLD, 1.0, HEATMAP_OPACITY)
    tagProvenance(heatmapNode, json.dumps(heatmap.note, sort_keys=True, default=str))
    return heatmapNode


def confidenceColorNode():
    """The confidence colour table (made once per scene): 256 entries from red (0) to yellow (1)."""
    existing = slicer.mrmlScene.GetFirstNodeByName(CONFIDENCE_COLOR_NODE_NAME)
    if existing is not None:
        return existing
    colorNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLColorTableNode")
    colorNode.UnRegister(None)  # the Python reference owns it (as Modules/Scripted/ImportItkSnapLabel does)
    colorNode.SetName(CONFIDENCE_COLOR_NODE_NAME)
    colorNode.SetTypeToUser()  # a user table: its entries may be set (Libs/MRML/Core/vtkMRMLColorTableNode.h)
    colorNode.SetNumberOfColors(256)
    for entry in range(256):
        colorNode.SetColor(entry, f"confidence {entry / 255:.2f}", 1.0, entry / 255.0, 0.0, 1.0)
    return slicer.mrmlScene.AddNode(colorNode)


def loadConfidence(confidencePath: Path, volumeNode, name: str, flagBelow: float):
    """A confidence volume over its input on the confidence colour table, only the voxels below
    `flagBelow` drawn (the ones to check)."""
    return loadOverlay(confidencePath, volumeNode, name, confidenceColorNode().GetID(), 0.0, flagBelow, CONFIDENCE_OPACITY)


def setConfidenceThreshold(confidenceNode, flagBelow: float) -> None:
    """Draw only the voxels whose confidence is below `flagBelow`."""
    displayNode = confidenceNode.GetDisplayNode()
    displayNode.SetThreshold(0.0, float(flagBelow))
    displayNode.ApplyThresholdOn()
