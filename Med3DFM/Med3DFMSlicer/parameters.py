"""The panel's state, saved with the scene: Slicer's parameterNodeWrapper over the module's parameter node."""

from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper

from Med3DFMSupport import choices, jobs


@parameterNodeWrapper
class Med3DFMParameterNode:
    """What the panel shows; saved with the scene.

    inputVolume - the CT/MR volume to process.
    outputSegmentation - None: a new segmentation node per run; a node: the model's segments in it are replaced or added, others kept.
    modelId - registry id of the segmentation model (id@version for an older version).
    showAllVersions - the model list shows every version of each model, not only the newest.
    rawLabelNames - segments named as the model card's labels instead of by their terminology.
    device - "auto", "cpu" or "cuda".
    show3D - build closed surfaces of the result.
    confidence - also a confidence overlay (the voxels below flagBelow) and the segments holding them.
    flagBelow - the confidence below which voxels are shown and counted.
    learnSegmentation - Learn from labels: the segmentation with the painted segments of inputVolume.
    learnName - the name of the new structure(s) and of the adapter.
    learnMode - "adapter" (a small trained network) or "prototype" (training-free instant guess).
    learnSource - "thisScan" (the painted slices of inputVolume) or "otherPatients" (labelled volumes).
    learnBudgetMinutes - other patients: the training time budget in minutes.
    classifierId - model id of the classification adapter used by Classify.
    classifyRoi - None: classify the whole volume; a segmentation: pool only inside its visible segments.
    heatmapMethod - "none", "attention", "gradcam" or "occlusion" (the slow reference).
    classifyPrevalence - "" (the training prevalence) or the expected share of classes, e.g. "mass=0.2".
    explainTarget - the segment of the Segment model that Explain maps.
    explainMethod - "gradcam" or "occlusion".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: Annotated[str, Default(choices.DEFAULT_MODEL)]
    showAllVersions: Annotated[bool, Default(False)]
    rawLabelNames: Annotated[bool, Default(False)]
    device: Annotated[str, Choice(list(choices.DEVICES)), Default("auto")]
    show3D: Annotated[bool, Default(True)]
    confidence: Annotated[bool, Default(False)]
    flagBelow: Annotated[float, WithinRange(0.05, 1.0), Default(choices.CONFIDENCE_FLAG_BELOW)]
    learnSegmentation: vtkMRMLSegmentationNode
    learnName: Annotated[str, Default("")]
    learnMode: Annotated[str, Choice(list(choices.LEARN_MODES)), Default("adapter")]
    learnSource: Annotated[str, Choice(list(choices.LEARN_SOURCES)), Default("thisScan")]
    learnBudgetMinutes: Annotated[float, WithinRange(jobs.BUDGET_MINUTES_RANGE[0], jobs.BUDGET_MINUTES_RANGE[1]), Default(jobs.BUDGET_MINUTES_DEFAULT)]
    classifierId: Annotated[str, Default("")]
    classifyRoi: vtkMRMLSegmentationNode
    heatmapMethod: Annotated[str, Choice(list(choices.HEATMAP_METHODS)), Default("attention")]
    classifyPrevalence: Annotated[str, Default("")]
    explainTarget: Annotated[str, Default("")]
    explainMethod: Annotated[str, Choice(list(choices.EXPLAIN_METHODS)), Default("gradcam")]
