"""What the panel checks before a job starts: where it runs and whether it fits (the estimate line under
the model list), and a restricted licence acknowledged (the dialog before Segment, Learn, Classify, Explain).

Functions of the widget's logic and parameter node, so Med3DFM.py only calls them; the arithmetic is
the job's own (Med3DFMSupport.environment, Med3DFMLib.windows).
"""

from typing import Optional

import slicer
from slicer.i18n import tr as _

from Med3DFMSupport import environment


def runsOnGpu(logic, device: str) -> bool:
    """Whether a job with `device` will use CUDA: what torch reported (the device probe), else a guess."""
    facts = logic.deviceFacts()
    if device == "cuda":
        return True
    if device != "auto":
        return False
    return facts.get("auto") == "cuda" if facts else logic.cudaLikelyAvailable()


def estimateText(logic, node) -> str:
    """Where the job will run, how long on the CPU, and whether the scan fits in main and GPU memory, before Segment.

    On CUDA the GPU's free and total memory come from torch.cuda.mem_get_info in the job interpreter (the
    probe starts here once, in the background; the line says "checking" until it answers)."""
    onGpu = runsOnGpu(logic, node.device)
    parts = []
    if onGpu:
        parts.append(gpuText(logic, node.modelId))
    else:
        seconds = logic.estimateSeconds(node.inputVolume, node.modelId)
        parts.append(_("Runs on the CPU: this can take a while.") if seconds is None else
                     _("Runs on the CPU: expect {duration}. A CUDA GPU is much faster.").format(duration=environment.describe_duration(seconds)))
    memory = logic.memoryCheck(node.inputVolume, node.modelId, onCpu=not onGpu)
    if memory is not None and memory[1] is not None:
        needed, available, fits = memory
        text = _("Needs about {needed} of memory ({available} free).") if fits else _(
            "Will not fit: needs about {needed} of memory, {available} free. Crop the volume to the region you need (Crop Volume module) "
            "or close other programs; a coarser copy does not help, the model resamples every scan to its own spacing.")
        parts.append(text.format(needed=environment.describe_bytes(needed), available=environment.describe_bytes(available)))
        factor = None if fits else logic.lowerResolutionToFit(node.inputVolume, node.modelId, onCpu=not onGpu)
        if factor is not None:
            parts.append(_("Segment offers to run the model at {factor}x its spacing instead, which fits (less detail).").format(factor=f"{factor:g}"))
    return " ".join(parts)


def gpuText(logic, modelId: str) -> str:
    """The GPU part of the estimate: the GPU, the memory one window needs against what is free, or why not known."""
    facts = logic.deviceFacts()
    if facts is None:
        logic.startDeviceProbe()
        return _("Runs on the GPU (CUDA); checking its memory...")
    if not facts:
        return _("Runs on the GPU (CUDA); its memory could not be read (see Copy diagnostics).")
    if not facts.get("cuda_devices"):
        return _("GPU (CUDA) chosen, but PyTorch sees no CUDA GPU here: the job will fail. Choose Automatic or CPU.")
    check = logic.gpuMemoryCheck(modelId)
    if check is None:
        return _("Runs on the GPU (CUDA).")
    needed, free, total, name, fits = check
    values = dict(name=name, needed=environment.describe_bytes(needed), total=environment.describe_bytes(total),
                  free=environment.describe_bytes(free) if free is not None else "?")
    if fits:
        return _("Runs on the GPU ({name}): needs about {needed} of GPU memory per window, {free} free of {total}.").format(**values)
    return _("Will not fit on the GPU ({name}): one window needs about {needed}, {free} free of {total}. Close programs using the GPU, "
             "or choose CPU (main memory is usually larger).").format(**values)


def lowerResolutionAccepted(logic, node, statusLabel) -> Optional[float]:
    """1.0 when the scan fits (or memory is unknown); for one that will not, the coarser factor that fits if
    the user accepts it; None (with a line in the status) when declined or when nothing fits."""
    onGpu = runsOnGpu(logic, node.device)
    memory = logic.memoryCheck(node.inputVolume, node.modelId, onCpu=not onGpu)
    if memory is None or memory[1] is None or memory[2]:
        return 1.0
    factor = logic.lowerResolutionToFit(node.inputVolume, node.modelId, onCpu=not onGpu)
    if factor is None:
        statusLabel.text = _("The scan does not fit in memory even at 4x the model's spacing: crop it (Crop Volume module). Not started.")
        return None
    question = _("This scan needs about {needed} of memory, {available} free. Segment it at {factor}x the model's spacing instead? "
                 "It fits, with less detail; the segments still come back on the scan's own grid.").format(
        needed=environment.describe_bytes(memory[0]), available=environment.describe_bytes(memory[1]), factor=f"{factor:g}")
    if not slicer.util.confirmOkCancelDisplay(question, _("Med3DFM: not enough memory")):
        statusLabel.text = _("Not enough memory for this scan: segmentation was not started.")
        return None
    return factor


def licenceAcknowledged(logic, modelId: str, statusLabel, notStarted: str, encoder: bool = False) -> bool:
    """Ask once before a model (or the encoder it runs on) whose licence restricts use is used; remembered
    per model in the file the command line reads. False, with `notStarted` in the status line, when declined."""
    question: Optional[str] = logic.licenceQuestion(modelId, encoder)
    if question and not logic.acknowledgeLicence(modelId, slicer.util.confirmOkCancelDisplay(question, _("Med3DFM: model licence")), encoder):
        statusLabel.text = notStarted
        return False
    return True
