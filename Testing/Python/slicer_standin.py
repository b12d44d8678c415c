"""A stand-in for the few Slicer calls the Med3DFM module's Logic makes, built on real VTK objects.

Slicer cannot be installed in CI, so this provides `slicer` (app, mrmlScene, util), `qt`, the
parameter-node wrapper and the scripted-module base classes just far enough for Med3DFM.py to import and
for its Logic and its self-test (Med3DFMTest, with a SampleData stand-in) to run the real path: a volume node (vtkImageData + IJK→RAS vtkMatrix4x4) written to a
file, the real CLI job, and the .seg.nrrd/.tsv read back into nodes. Readers and writers behave as
Slicer's do: RAS node geometry, LPS files, segment metadata from the NRRD header's Segment<N>_* fields.

It is not a model of Slicer: only the calls Med3DFM.py makes exist, so a call it does not know fails.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import tempfile
import types
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ids = itertools.count(1)


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _image_data(array_kji: np.ndarray) -> vtk.vtkImageData:
    image = vtk.vtkImageData()
    image.SetDimensions(array_kji.shape[2], array_kji.shape[1], array_kji.shape[0])
    flat = numpy_support.numpy_to_vtk(np.ascontiguousarray(array_kji).ravel(), deep=True)
    image.GetPointData().SetScalars(flat)
    return image


def _array(image: vtk.vtkImageData) -> np.ndarray:
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)


def _sitk_from(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    ijk_to_lps = LPS_TO_RAS @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image


# --- nodes ------------------------------------------------------------------------------------------

class Node:
    def __init__(self, name: str = "") -> None:
        self._name = name
        self._id = f"{type(self).__name__}{next(_ids)}"
        self._attributes: Dict[str, str] = {}
        self.scene: Optional["Scene"] = None

    def GetID(self) -> str:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def SetAttribute(self, key: str, value: str) -> None:
        self._attributes[key] = value

    def GetAttribute(self, key: str) -> Optional[str]:
        return self._attributes.get(key)

    def Modified(self) -> None:
        pass

    def GetStorageNode(self) -> Optional["Node"]:
        return getattr(self, "_storage", None)

    def SetAndObserveStorageNodeID(self, node_id: Optional[str]) -> None:
        self._storage = None if node_id is None else next(n for n in slicer.mrmlScene.nodes if n.GetID() == node_id)


class Transformable(Node):
    """vtkMRMLTransformableNode: a parent transform node by ID (volumes and segmentations; tables have none)."""

    _transform_id: Optional[str] = None

    def SetAndObserveTransformNodeID(self, node_id: Optional[str]) -> bool:
        self._transform_id = node_id or None
        return True

    def GetTransformNodeID(self) -> Optional[str]:
        return self._transform_id

    def to_world(self) -> np.ndarray:
        """The 4x4 matrix from this node's own RAS frame to world RAS (its chain of parent transforms)."""
        matrix = np.eye(4)
        transform_id = self._transform_id
        while transform_id:
            transform = next(n for n in slicer.mrmlScene.nodes if n.GetID() == transform_id)
            matrix = _matrix_to_numpy(transform._to_parent) @ matrix
            transform_id = transform.GetTransformNodeID()
        return matrix


class vtkMRMLLinearTransformNode(Transformable):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._to_parent = vtk.vtkMatrix4x4()

    def SetMatrixTransformToParent(self, matrix: vtk.vtkMatrix4x4) -> int:
        self._to_parent.DeepCopy(matrix)
        return 1


class vtkMRMLScalarVolumeNode(Transformable):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._image: Optional[vtk.vtkImageData] = None
        self._ijk_to_ras = vtk.vtkMatrix4x4()

    def SetAndObserveImageData(self, image: vtk.vtkImageData) -> None:
        self._image = image

    def GetImageData(self) -> Optional[vtk.vtkImageData]:
        return self._image

    def SetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._ijk_to_ras.DeepCopy(matrix)

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        matrix.DeepCopy(self._ijk_to_ras)

    def GetSpacing(self):
        return tuple(float(s) for s in np.linalg.norm(_matrix_to_numpy(self._ijk_to_ras)[:3, :3], axis=0))

    def GetDisplayNode(self) -> Optional["vtkMRMLScalarVolumeDisplayNode"]:
        return getattr(self, "_display", None)

    def CreateDefaultDisplayNodes(self) -> None:
        if getattr(self, "_display", None) is None:
            self._display = vtkMRMLScalarVolumeDisplayNode()


class vtkMRMLScalarVolumeDisplayNode(Node):
    """Colour table, window/level and threshold, as the Logic sets them for a heatmap overlay."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.color_node_id = "vtkMRMLColorTableNodeGrey"
        self.auto_window_level = True
        self.window_level_min_max = (0.0, 0.0)
        self.threshold = (0.0, 0.0)
        self.apply_threshold = False

    def SetAndObserveColorNodeID(self, node_id: str) -> None:
        self.color_node_id = node_id

    def GetColorNodeID(self) -> str:
        return self.color_node_id

    def AutoWindowLevelOff(self) -> None:
        self.auto_window_level = False

    def SetWindowLevelMinMax(self, low: float, high: float) -> None:
        self.window_level_min_max = (float(low), float(high))

    def SetThreshold(self, lower: float, upper: float) -> None:
        self.threshold = (float(lower), float(upper))

    def ApplyThresholdOn(self) -> None:
        self.apply_threshold = True


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    pass


class vtkMRMLColorTableNode(Node):
    """A user colour table: entries are set one by one, as the Logic does for the confidence overlay."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.type = "File"
        self.colors: List[Tuple[str, Tuple[float, float, float, float]]] = []

    def SetTypeToUser(self) -> None:
        self.type = "User"

    def UnRegister(self, _owner: Any) -> None:
        pass  # VTK reference counting; nothing to do in Python

    def SetNumberOfColors(self, n: int) -> None:
        self.colors = [("", (0.0, 0.0, 0.0, 0.0))] * int(n)

    def GetNumberOfColors(self) -> int:
        return len(self.colors)

    def SetColor(self, entry: int, name: str, r: float, g: float, b: float, a: float = 1.0) -> int:
        if self.type != "User" or not 0 <= entry < len(self.colors):
            return 0  # Slicer refuses edits of a non-user table or out of range
        self.colors[entry] = (name, (r, g, b, a))
        return 1


class vtkMRMLVolumeArchetypeStorageNode(Node):
    """Writes a volume node as Slicer does: voxels in IJK order, geometry converted from RAS to LPS."""

    def __init__(self) -> None:
        super().__init__()
        self._file = ""
        self.compression = True
        self.references = 1

    def SetFileName(self, name: str) -> None:
        self._file = name

    def GetFileName(self) -> str:
        return self._file

    def UseCompressionOff(self) -> None:
        self.compression = False

    def WriteData(self, node: vtkMRMLScalarVolumeNode) -> int:
        image = _sitk_from(_array(node.GetImageData()), _matrix_to_numpy(node._ijk_to_ras))
        sitk.WriteImage(image, self._file, self.compression)
        return 1

    def UnRegister(self, _owner: Any) -> None:
        self.references -= 1


class Segment:
    def __init__(self, name: str, color, mask_kji: np.ndarray, ijk_to_ras: np.ndarray) -> None:
        self._name = name
        self._color = tuple(float(c) for c in color)
        self._tags: Dict[str, str] = {}
        self.labelmap = _image_data(mask_kji.astype(np.uint8))
        self.ijk_to_ras = _numpy_to_matrix(ijk_to_ras)
        self.closed_surface: Optional[vtk.vtkPolyData] = None

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def GetColor(self):
        return self._color

    def SetColor(self, r: float, g: float, b: float) -> None:
        self._color = (float(r), float(g), float(b))

    def SetTag(self, key: str, value: str) -> None:
        self._tags[key] = value

    def GetTerminology(self) -> str:
        return self._tags.get("TerminologyEntry", "")

    def copy(self) -> "Segment":
        other = Segment(self._name, self._color, _array(self.labelmap).copy(), _matrix_to_numpy(self.ijk_to_ras))
        other._tags = dict(self._tags)
        return other


class Segmentation:
    """vtkSegmentation (Libs/vtkSegmentationCore/vtkSegmentation.{h,cxx}): segments by ID, in list order."""

    def __init__(self) -> None:
        self._segments: Dict[str, Segment] = {}
        self._id_index = 0  # SegmentIdAutogeneratorIndex

    def GetNumberOfSegments(self) -> int:
        return len(self._segments)

    def GetNthSegmentID(self, index: int) -> str:
        return list(self._segments)[index]

    def GetNthSegment(self, index: int) -> Segment:
        return list(self._segments.values())[index]

    def GetSegment(self, segment_id: str) -> Optional[Segment]:
        return self._segments.get(segment_id)

    def GetSegmentIdBySegmentName(self, name: str) -> str:
        """Case-insensitive; the first match in ID order (Slicer walks its std::map of segments), "" if none."""
        return next((sid for sid in sorted(self._segments) if self._segments[sid].GetName().lower() == name.lower()), "")

    def GenerateUniqueSegmentID(self, segment_id: str = "") -> str:
        """An unused ID as Slicer makes one: the ID itself if free, else ID_N with a growing counter."""
        if segment_id and segment_id not in self._segments:
            return segment_id
        if not segment_id:
            return next(f"Segment_{n}" for n in itertools.count(len(self._segments) + 1) if f"Segment_{n}" not in self._segments)
        while True:
            self._id_index += 1
            candidate = f"{segment_id}_{self._id_index}"
            if candidate not in self._segments:
                return candidate

    def AddEmptySegment(self, segment_id: str = "", segment_name: str = "", color=None) -> str:
        """vtkSegmentation::AddEmptySegment(segmentId, segmentName, color): an all-zero 1-voxel labelmap."""
        segment_id = self.GenerateUniqueSegmentID(segment_id)
        self._segments[segment_id] = Segment(segment_name or segment_id, color or (0.5, 0.5, 0.5), np.zeros((1, 1, 1), np.uint8), np.eye(4))
        return segment_id

    def AddSegment(self, segment: Segment, segment_id: str = "", insert_before_segment_id: str = "") -> bool:
        """vtkSegmentation::AddSegment(segment, segmentId, insertBeforeSegmentId): at the end, or before the
        given segment. Slicer does not check that the ID is free (its ID list would hold it twice): refused here."""
        key = segment_id or self.GenerateUniqueSegmentID()
        if key in self._segments:
            raise ValueError(f"AddSegment: segment ID {key} is already in the segmentation")
        if not insert_before_segment_id or insert_before_segment_id not in self._segments:
            self._segments[key] = segment
            return True
        items = list(self._segments.items())
        position = [k for k, _ in items].index(insert_before_segment_id)
        items.insert(position, (key, segment))
        self._segments = dict(items)
        return True

    def CopySegmentFromSegmentation(self, source: "Segmentation", segment_id: str, remove_from_source: bool = False) -> bool:
        """A deep copy added at the end under the same ID, or a unique one made from it when the ID is
        taken (Slicer warns and does the same); nothing else in this segmentation changes."""
        if source is None or not segment_id:
            return False
        segment = source.GetSegment(segment_id)
        if segment is None:
            return False
        new_id = self.GenerateUniqueSegmentID(segment_id)
        self._segments[new_id] = segment if remove_from_source else segment.copy()
        if remove_from_source:
            del source._segments[segment_id]
        return True


class vtkMRMLSegmentationDisplayNode(Node):
    """Per-segment visibility (all visible unless hidden), as the Segment Editor's eye icons set it."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._hidden: set = set()

    def GetSegmentVisibility(self, segment_id: str) -> bool:
        return segment_id not in self._hidden

    def SetSegmentVisibility(self, segment_id: str, visible: bool) -> None:
        (self._hidden.discard if visible else self._hidden.add)(segment_id)


class vtkMRMLSegmentationNode(Transformable):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._segmentation = Segmentation()
        self.reference_geometry: Optional[np.ndarray] = None
        self.reference_extent = None
        self.display_nodes = 0
        self._display: Optional[vtkMRMLSegmentationDisplayNode] = None

    def GetDisplayNode(self) -> Optional[vtkMRMLSegmentationDisplayNode]:
        return self._display

    def GetSegmentation(self) -> Segmentation:
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume: vtkMRMLScalarVolumeNode) -> None:
        self.reference_geometry = _matrix_to_numpy(volume._ijk_to_ras)
        self.reference_extent = volume.GetImageData().GetExtent()

    def CreateDefaultDisplayNodes(self) -> None:
        self.display_nodes = 1
        if self._display is None:
            self._display = vtkMRMLSegmentationDisplayNode()

    def CreateClosedSurfaceRepresentation(self) -> bool:
        for segment in self._segmentation._segments.values():
            surface = vtk.vtkDiscreteFlyingEdges3D()
            surface.SetInputData(segment.labelmap)
            surface.SetValue(0, 1)
            surface.Update()
            segment.closed_surface = surface.GetOutput()
        return True


class vtkMRMLTableNode(Node):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._table = vtk.vtkTable()

    def AddColumn(self, array: vtk.vtkAbstractArray) -> vtk.vtkAbstractArray:
        self._table.AddColumn(array)
        return array

    def GetTable(self) -> vtk.vtkTable:
        return self._table

    def GetNumberOfRows(self) -> int:
        return self._table.GetNumberOfRows()


class vtkMRMLScriptedModuleNode(Node):
    pass


class SubjectHierarchy:
    """Items with parents; the scene item is 1. Only the calls the module makes."""

    def __init__(self) -> None:
        self._scene_item = 1
        self._parents: Dict[int, int] = {}
        self._names: Dict[int, str] = {1: "Scene"}
        self._by_node: Dict[str, int] = {}
        self._attributes: Dict[Any, str] = {}
        self._next = itertools.count(2)

    def GetSceneItemID(self) -> int:
        return self._scene_item

    def _new(self, parent: int, name: str) -> int:
        item = next(self._next)
        self._parents[item] = parent
        self._names[item] = name
        return item

    def CreatePatientItem(self, parent: int, name: str) -> int:
        return self._new(parent, name)

    def CreateStudyItem(self, parent: int, name: str) -> int:
        return self._new(parent, name)

    def GetItemByDataNode(self, node: Node) -> int:
        if node.GetID() not in self._by_node:
            self._by_node[node.GetID()] = self._new(self._scene_item, node.GetName())
        return self._by_node[node.GetID()]

    def GetItemParent(self, item: int) -> int:
        return self._parents.get(item, 0)

    def SetItemAttribute(self, item: int, name: str, value: str) -> None:
        self._attributes[(item, name)] = value

    def GetItemAttribute(self, item: int, name: str) -> str:
        """Slicer returns "" for an attribute the item does not have."""
        return self._attributes.get((item, name), "")

    def SetItemParent(self, item: int, parent: int) -> None:
        self._parents[item] = parent


class Scene:
    NODE_CLASSES = {cls.__name__: cls for cls in (vtkMRMLScalarVolumeNode, vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode,
                                                 vtkMRMLTableNode, vtkMRMLScriptedModuleNode, vtkMRMLLinearTransformNode, vtkMRMLColorTableNode)}
    StartCloseEvent = 1
    EndCloseEvent = 2

    def __init__(self) -> None:
        self.nodes: List[Node] = []
        self._sh = SubjectHierarchy()

    def AddNewNodeByClass(self, class_name: str, name: str = "") -> Node:
        node = self.NODE_CLASSES[class_name](name)
        return self.AddNode(node)

    def AddNode(self, node: Node) -> Node:
        node.scene = self
        self.nodes.append(node)
        return node

    def CreateNodeByClass(self, class_name: str) -> Node:
        if class_name == "vtkMRMLVolumeArchetypeStorageNode":
            return vtkMRMLVolumeArchetypeStorageNode()
        return self.NODE_CLASSES[class_name]()

    def RemoveNode(self, node: Node) -> None:
        self.nodes.remove(node)

    def GetSubjectHierarchyNode(self) -> SubjectHierarchy:
        return self._sh

    def GetFirstNodeByName(self, name: str) -> Optional[Node]:
        return next((n for n in self.nodes if n.GetName() == name), None)

    def GetFirstNodeByClass(self, class_name: str) -> Optional[Node]:
        return next((n for n in self.nodes if type(n).__name__ == class_name), None)

    def GetNumberOfNodesByClass(self, class_name: str) -> int:
        return sum(1 for n in self.nodes if type(n).__name__ == class_name)

    def Clear(self) -> None:
        self.nodes.clear()


# --- readers (what slicer.util.load* do for these files) ----------------------------------------------

def loadVolume(path: str, properties: Optional[Dict[str, Any]] = None) -> vtkMRMLScalarVolumeNode:
    """Slicer's `loadVolume(filename, properties)`: "name", "labelmap", "show" (ignored here) are understood."""
    properties = properties or {}
    labelmap = bool(properties.get("labelmap", False))
    image = sitk.ReadImage(str(path))
    spacing = np.array(image.GetSpacing())
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * spacing
    ijk_to_lps[:3, 3] = image.GetOrigin()
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = slicer.mrmlScene.AddNewNodeByClass(cls, properties.get("name") or Path(path).name.split(".")[0])
    node.SetAndObserveImageData(_image_data(sitk.GetArrayFromImage(image)))
    node.SetIJKToRASMatrix(_numpy_to_matrix(LPS_TO_RAS @ ijk_to_lps))
    node.CreateDefaultDisplayNodes()
    _attach_storage(node, path)
    return node


def _attach_storage(node: Node, path: str) -> None:
    """As Slicer's readers do: a storage node in the scene remembers the file the node came from."""
    storage = slicer.mrmlScene.AddNode(vtkMRMLVolumeArchetypeStorageNode())
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())


def loadLabelVolume(path: str, properties: Optional[Dict[str, Any]] = None) -> vtkMRMLScalarVolumeNode:
    return loadVolume(path, {**(properties or {}), "labelmap": True})


SLICE_LAYERS: Dict[str, Any] = {}  # what the last setSliceViewerLayers call asked the slice views to show


def setSliceViewerLayers(background: Any = "keep-current", foreground: Any = "keep-current", label: Any = "keep-current",
                         foregroundOpacity: Optional[float] = None, labelOpacity: Optional[float] = None, fit: bool = False,
                         rotateToVolumePlane: bool = False) -> None:
    SLICE_LAYERS.update(background=background, foreground=foreground, foregroundOpacity=foregroundOpacity)


def _parse_segment_fields(header: Dict[str, Any]) -> List[Dict[str, str]]:
    segments = []
    for index in itertools.count():
        prefix = f"Segment{index}_"
        if prefix + "ID" not in header:
            break
        segments.append({key[len(prefix):]: value for key, value in header.items() if key.startswith(prefix)})
    return segments


def loadSegmentation(path: str) -> vtkMRMLSegmentationNode:
    """Read a .seg.nrrd like Slicer's segmentation storage node: voxels, geometry and Segment<N>_* fields."""
    import nrrd

    data, header = nrrd.read(str(path), index_order="C")
    # C index order reverses the file's axes: (i, j, k[, list]) in the file is (k, j, i) here, and a
    # leading list axis (layers) in the file ends up last.
    directions = [row for row in header["space directions"] if row is not None and not np.all(np.isnan(np.asarray(row, dtype=float)))]
    space_directions = np.array(directions, dtype=float)
    data = np.moveaxis(data, -1, 0) if data.ndim == 4 else data[np.newaxis]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = space_directions.T
    ijk_to_lps[:3, 3] = np.array(header["space origin"], dtype=float)
    ijk_to_ras = LPS_TO_RAS @ ijk_to_lps
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", Path(path).name.split(".")[0])
    for fields in _parse_segment_fields(header):
        layer = int(fields.get("Layer", 0))
        value = int(fields.get("LabelValue", 1))
        mask = data[layer] == value
        segment = Segment(fields["Name"], [float(c) for c in fields["Color"].split()], mask, ijk_to_ras)
        for tag in fields.get("Tags", "").split("|"):
            if ":" in tag:
                key, value_text = tag.split(":", 1)
                segment.SetTag(key, value_text)
        node.GetSegmentation().AddSegment(segment, fields["ID"])
    _attach_storage(node, path)
    return node


def arrayFromVolume(node: vtkMRMLScalarVolumeNode) -> np.ndarray:
    return _array(node.GetImageData())


def arrayFromSegmentBinaryLabelmap(node: vtkMRMLSegmentationNode, segment_id: str, reference: vtkMRMLScalarVolumeNode) -> np.ndarray:
    """The segment resampled onto the reference volume's grid (nearest neighbour in world space: Slicer's
    Segmentations logic goes through both nodes' parent transforms)."""
    segment = node.GetSegmentation().GetSegment(segment_id)
    mask = _sitk_from(_array(segment.labelmap), node.to_world() @ _matrix_to_numpy(segment.ijk_to_ras))
    ref = _sitk_from(arrayFromVolume(reference), reference.to_world() @ _matrix_to_numpy(reference._ijk_to_ras))
    resampled = sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def updateSegmentBinaryLabelmapFromArray(narray: np.ndarray, node: vtkMRMLSegmentationNode, segment_id: str,
                                         reference: Optional[vtkMRMLScalarVolumeNode] = None) -> None:
    """Replace a segment's voxels with a mask on the reference volume's grid (Slicer: same signature)."""
    segment = node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise RuntimeError(f"segment {segment_id} not found")
    if reference is None or tuple(narray.shape) != tuple(reversed(reference.GetImageData().GetDimensions())):
        raise RuntimeError("the array does not match the reference volume")
    segment.labelmap = _image_data((np.asarray(narray) > 0).astype(np.uint8))
    # the mask lies on the reference grid in the reference's frame; the segment is stored in the node's own frame
    to_node = np.linalg.inv(node.to_world()) @ reference.to_world()
    segment.ijk_to_ras = _numpy_to_matrix(to_node @ _matrix_to_numpy(reference._ijk_to_ras))
    segment.closed_surface = None


# --- modules ------------------------------------------------------------------------------------------

class Settings:
    """The QSettings that slicer.app.settings() returns (Base/QTCore/qSlicerCoreApplication.h), in memory:
    value(key) is None for a key never set; sync() writes to disk in Slicer."""

    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}
        self.syncs = 0

    def value(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def setValue(self, key: str, value: Any) -> None:
        self.values[key] = value

    def contains(self, key: str) -> bool:
        return key in self.values

    def remove(self, key: str) -> None:
        self.values.pop(key, None)

    def sync(self) -> None:
        self.syncs += 1


slicer = types.ModuleType("slicer")


def install() -> types.ModuleType:
    """Put the stand-in modules in sys.modules (idempotent) and return `slicer`."""
    if sys.modules.get("slicer") is slicer:
        return slicer

    settings = Settings()
    app = types.SimpleNamespace(
        slicerHome=None,
        temporaryPath=tempfile.mkdtemp(prefix="slicer-standin-"),
        applicationVersion="stand-in",
        repositoryRevision="0",
        testingEnabled=lambda: True,
        connect=lambda *args: None,
        settings=lambda: settings,
    )
    util = types.ModuleType("slicer.util")

    class VTKObservationMixin:
        def __init__(self) -> None:
            self.observers: List[Any] = []

        def addObserver(self, *args: Any) -> None:
            self.observers.append(args)

        def removeObserver(self, *args: Any) -> None:
            pass

        def removeObservers(self) -> None:
            self.observers.clear()

    util.VTKObservationMixin = VTKObservationMixin
    for function in (loadVolume, loadLabelVolume, loadSegmentation, arrayFromVolume, arrayFromSegmentBinaryLabelmap,
                     updateSegmentBinaryLabelmapFromArray, setSliceViewerLayers):
        setattr(util, function.__name__, function)

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")

    class _Annotation:
        def __init__(self, *args: Any) -> None:
            self.args = args

    wrapper.Default = type("Default", (_Annotation,), {})
    wrapper.Choice = type("Choice", (_Annotation,), {})
    wrapper.WithinRange = type("WithinRange", (_Annotation,), {})  # validators.WithinRange(minimum, maximum)
    wrapper.parameterNodeWrapper = lambda cls: cls

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            pass

        def getParameterNode(self) -> Node:
            return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """Slicer's base class is a unittest.TestCase with delayDisplay; the self-test runs unchanged."""

        def delayDisplay(self, message: str, requestedDelay: Optional[int] = None, msec: Optional[int] = None) -> None:
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)

    slicer.app = app
    slicer.mrmlScene = Scene()
    slicer.util = util
    slicer.i18n = i18n
    slicer.parameterNodeWrapper = wrapper
    slicer.ScriptedLoadableModule = scripted
    slicer.vtkMRMLScalarVolumeNode = vtkMRMLScalarVolumeNode
    slicer.vtkMRMLSegmentationNode = vtkMRMLSegmentationNode
    # Libs/MRML/Core/vtkMRMLSubjectHierarchyConstants.h: the attribute DICOM loading sets on a series item
    slicer.vtkMRMLSubjectHierarchyConstants = types.SimpleNamespace(GetDICOMSeriesModalityAttributeName=lambda: "DICOM.Modality")
    slicer.__path__ = []  # a package, so `import slicer.util` works

    sample_data = types.ModuleType("SampleData")

    class SampleDataLogic:
        sources: Dict[str, Dict[str, Any]] = {}

        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None,
                                           customDownloader=None, thumbnailFileName=None, loadFileTypes=None, loadFiles=None,
                                           loadFileProperties={}, checksums=None, loadFileType=None):
            """The signature of Slicer's SampleData.SampleDataLogic (Modules/Scripted/SampleData/SampleData.py)."""
            SampleDataLogic.sources[sampleName] = {"uris": uris, "fileNames": fileNames, "nodeNames": nodeNames, "checksums": checksums}

    def downloadSample(sample_name: str) -> vtkMRMLScalarVolumeNode:
        """A registered local sample: the file behind its file:// URI, checked against its checksum, loaded."""
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        source = SampleDataLogic.sources[sample_name]
        path = url2pathname(urlparse(source["uris"]).path)
        algorithm, digest = source["checksums"].split(":", 1)
        assert hashlib.new(algorithm.lower(), Path(path).read_bytes()).hexdigest() == digest, "sample checksum mismatch"
        return loadVolume(path, {"name": source["nodeNames"]})

    sample_data.SampleDataLogic = SampleDataLogic
    sample_data.downloadSample = downloadSample

    qt = types.ModuleType("qt")  # the Logic makes no Qt calls; the Widget is not exercised here
    sys.modules.update({
        "slicer": slicer,
        "slicer.util": util,
        "slicer.i18n": i18n,
        "slicer.parameterNodeWrapper": wrapper,
        "slicer.ScriptedLoadableModule": scripted,
        "qt": qt,
        "SampleData": sample_data,
    })
    return slicer
