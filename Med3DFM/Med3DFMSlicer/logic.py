"""Med3DFMLogic: what the panel's buttons do, usable from scripts without the panel.

Each task is a background job in three steps: start* writes the input volume (and any painted
segments) into a job folder and starts the `med3dfm` command (Med3DFMSupport.jobs); the caller
polls job.poll(); finish* turns the job's files into nodes (nodes.py). The synchronous form (segment,
classify, explain, learnFromLabels, learnFromOtherPatients) does all three for scripts and tests.
"""

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from Med3DFMSlicer import installer, nodes
from Med3DFMSlicer.parameters import Med3DFMParameterNode
from Med3DFMSupport import choices, dependencies, environment, fit, jobs, results
from Med3DFMSupport.jobs import Med3DFMJobError

MODULE_DIR = Path(__file__).resolve().parent.parent  # the folder of Med3DFM.py
DEFAULT_MODEL = choices.DEFAULT_MODEL
CONFIDENCE_FLAG_BELOW = choices.CONFIDENCE_FLAG_BELOW
KEPT_CONFIDENCE_MAPS = 2  # the latest confidence overlays whose flags the slider can recompute


class Med3DFMLogic(ScriptedLoadableModuleLogic):
    """Segment volumes with Med3DFM from scripts or the panel.

    Scripts::

        logic = Med3DFMLogic()
        segmentationNode, tableNode = logic.segment(volumeNode, "hippocampus-mr-demo", device="auto")
        # paint a few slices of a new structure in the Segment Editor, then:
        adapterPath = logic.learnFromLabels(volumeNode, paintedSegmentationNode, "left atrium")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.libraryRoot = environment.ensure_library_importable(MODULE_DIR)
        self.resources = environment.resources_dir(self.libraryRoot)
        self.lastJob: Optional[Dict[str, Any]] = None
        self._dependenciesOk = False
        self._scanFacts: Tuple[Any, Any] = (None, None)  # (volumeKey, facts) of the last volume measured
        self._confidenceMaps: Dict[str, "results.ConfidenceMap"] = {}  # confidence node ID -> its labels and confidence
        self._deviceProbe: Optional["jobs.Job"] = None  # `devices --json` running in the job interpreter
        self._deviceFacts: Optional[Dict[str, Any]] = None  # its report, once it has ended

    def getParameterNode(self):
        return Med3DFMParameterNode(super().getParameterNode())

    # --- environment ---------------------------------------------------------------------------

    def pythonExecutable(self) -> str:
        return environment.python_executable(slicer.app.slicerHome)

    def jobEnvironment(self) -> Dict[str, str]:
        return environment.job_environment(os.environ, self.libraryRoot)

    def registryPath(self) -> Path:
        """The registry the jobs read: MED3DFM_REGISTRY (a private registry) if set, else the bundled models.json."""
        return Path(os.environ.get("MED3DFM_REGISTRY") or self.resources / "models.json")

    def modelsFolder(self) -> Path:
        from Med3DFMLib.registry.cache import models_home  # torch-free

        return models_home()

    def adaptersFolder(self) -> Path:
        """Where learned adapters are kept until (and after) they are saved to the model folder."""
        base = Path(slicer.app.temporaryPath or tempfile.gettempdir())
        return base / "Med3DFM-adapters"

    def requirements(self) -> List[str]:
        return dependencies.read_requirements(self.resources / "requirements.txt")

    def ensureDependencies(self, askConfirmation: bool = True, force: bool = False) -> bool:
        """Install what the jobs need into Slicer's Python, on the main thread, after one consent dialog
        (installer.ensureDependencies). Returns False if the user declined or something is still missing."""
        if self._dependenciesOk and not force:
            return True
        self._dependenciesOk = installer.ensureDependencies(self.requirements(), askConfirmation, force)
        return self._dependenciesOk

    def cudaLikelyAvailable(self) -> bool:
        return dependencies.cuda_likely_available()

    def deviceFacts(self) -> Optional[Dict[str, Any]]:
        """What torch in the job interpreter reports (`med3dfm devices --json`: CUDA GPUs with free and total
        memory from torch.cuda.mem_get_info, what `auto` picks); None until startDeviceProbe's job has ended."""
        return self._deviceFacts

    def startDeviceProbe(self) -> bool:
        """Ask torch once per session, in the background (importing torch takes seconds); True while it runs."""
        if self._deviceFacts is None and self._deviceProbe is None:
            self._deviceProbe = jobs.Job(jobs.devices_command(self.pythonExecutable(), as_json=True), kind="devices", env=self.jobEnvironment()).start()
        return self._deviceProbe is not None

    def deviceProbeRunning(self) -> bool:
        return self._deviceProbe is not None

    def cancelDeviceProbe(self) -> None:
        """End a probe still running (the panel is closing); the next one asks again."""
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
            self._deviceProbe = None

    def pollDeviceProbe(self) -> bool:
        """Read the probe's output; True when it has just ended (its report, or {} if it failed, is then in deviceFacts)."""
        probe = self._deviceProbe
        if probe is None:
            return False
        probe.poll()
        if not probe.finished:
            return False
        self._deviceProbe = None
        result = probe.result()
        self._deviceFacts = (jobs.device_report(result.stdout_text) if result.ok else None) or {}
        if not result.ok:
            logging.warning(f"Med3DFM: med3dfm devices failed: {result.error}")
        return True

    def gpuMemoryCheck(self, modelId: str) -> Optional[Tuple[int, Optional[int], int, str, bool]]:
        """(bytes one window needs on the GPU, free, total, GPU name, fits) from the probe's report; None if unknown."""
        entry = self.registryEntry(modelId)
        if not entry or not self._deviceFacts:
            return None
        return environment.gpu_memory_check(entry.get("input", {}), self._deviceFacts)

    def rememberJob(self, result: "jobs.JobResult") -> None:
        self.lastJob = result.as_dict()

    def diagnostics(self) -> str:
        info = {
            "Slicer": f"{slicer.app.applicationVersion} ({slicer.app.repositoryRevision})",
            "Slicer home": slicer.app.slicerHome,
            "job interpreter": self.pythonExecutable(),
            "Med3DFM library": str(self.libraryRoot / "Med3DFMLib"),
            "model registry": str(self.registryPath()),
            "model folder": str(self.modelsFolder()),
            "CUDA (likely)": "yes" if self.cudaLikelyAvailable() else "no",
        }
        names = ["torch"] + [dependencies.requirement_name(r) for r in self.requirements()]
        return environment.diagnostics_text(info, self.lastJob, dependencies.installed_versions(names), self.deviceReport())

    def deviceReport(self, timeout: float = 60) -> str:
        """What `med3dfm devices` says in the job interpreter (torch is imported there, not in Slicer's process)."""
        try:
            finished = subprocess.run(jobs.devices_command(self.pythonExecutable()), capture_output=True, text=True, timeout=timeout, env=self.jobEnvironment())
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"could not ask the job interpreter: {err}"
        if finished.returncode != 0:
            return "med3dfm devices failed: " + (finished.stderr.strip().splitlines() or ["no message"])[-1]
        return finished.stdout

    # --- the model lists -----------------------------------------------------------------------

    def registryModels(self, task: Optional[str] = None) -> List[Dict[str, Any]]:
        registry = environment.read_registry(self.registryPath())
        return [m for m in registry.get("models", []) if task is None or m.get("task") == task]

    def registryEntry(self, modelId: str) -> Optional[Dict[str, Any]]:
        """The registry's entry of `modelId` (or `id@version`), None for a model it does not list."""
        return environment.registry_entry(environment.read_registry(self.registryPath()), modelId)

    def installedAdapters(self) -> List[Dict[str, Any]]:
        try:
            return results.installed_models(self.modelsFolder(), task="adapter")
        except Exception as err:  # an unreadable model folder must not hide the rest
            logging.warning(f"Med3DFM: cannot list saved adapters: {err}")
            return []

    def segmentModelChoices(self, allVersions: bool = False) -> List[Tuple[str, str]]:
        """(label, spec) for the Segment model list: registry segmentation models (each version with
        `allVersions`), then adapters saved from Learn from labels."""
        return results.segment_model_choices(self.registryModels(task="segment"), self.installedAdapters(), allVersions)

    def classifierChoices(self) -> List[Tuple[str, str]]:
        """(label, id) for the Classify model list: classification adapters in the model folder."""
        return results.classifier_choices(self.installedAdapters())

    def explainTargets(self, modelId: str) -> List[str]:
        """The segment names Explain accepts for a registry model or a saved segmentation adapter."""
        entry = self.registryEntry(modelId)
        if entry is None:
            entry = next((e for e in self.installedAdapters() if e.get("id") == modelId), None)
        return results.segment_names(entry)

    volumeKey = staticmethod(nodes.volumeKey)

    def scanFacts(self, volumeNode):
        """What the domain check needs to know about a volume node: extent, intensities, DICOM Modality."""
        key = nodes.volumeKey(volumeNode)
        if key is None:
            return None
        if self._scanFacts[0] != key:
            voxels = slicer.util.arrayFromVolume(volumeNode)
            if voxels.ndim != 3:  # e.g. RGB: not a scan any model takes (the job says so)
                return None
            self._scanFacts = (key, fit.scan_facts(voxels, nodes.ijkToRasArray(volumeNode), nodes.dicomModality(volumeNode)))
        return self._scanFacts[1]

    def modelFits(self, volumeNode, allVersions: bool = False) -> List["fit.ModelFit"]:
        """The Segment model list, each marked as fitting `volumeNode` or not (unmarked without a volume)."""
        registry = {"models": self.registryModels(task="segment")}
        entries: Dict[str, Dict[str, Any]] = {}
        for entry in registry["models"] + self.installedAdapters():
            # as segmentModelChoices: the registry's newest entry under its id first, each version under id@version
            entries.setdefault(entry["id"], environment.registry_entry(registry, entry["id"]) or entry)
            entries.setdefault(f"{entry['id']}@{entry.get('version')}", entry)
        return fit.mark_model_choices(self.segmentModelChoices(allVersions), entries, self.scanFacts(volumeNode))

    def estimateSeconds(self, volumeNode, modelId: str) -> Optional[float]:
        entry = self.registryEntry(modelId)
        imageData = volumeNode.GetImageData() if volumeNode else None
        if not entry or imageData is None:
            return None
        return environment.estimate_cpu_seconds(imageData.GetDimensions(), volumeNode.GetSpacing(), entry.get("input", {}))

    def licenceCards(self, modelId: str, encoder: bool = False) -> List[Dict[str, Any]]:
        """The cards whose licences a job with `modelId` is bound by: the model's and, for an adapter, its
        encoder's; `encoder`: the encoder Learn trains on (the job's own check, licences.cards_for)."""
        from Med3DFMLib.registry import licences

        return licences.cards_for(modelId, encoder=encoder)

    def licenceQuestion(self, modelId: str, encoder: bool = False) -> Optional[str]:
        """The question to ask before a model (or the encoder it runs on) whose licence restricts use runs
        for the first time; None when none restricts use or all were acknowledged (torch-free)."""
        from Med3DFMLib.registry import licences

        pending = [card for card in self.licenceCards(modelId, encoder) if not licences.is_acknowledged(card)]
        if not pending:
            return None
        return " ".join(_("{model} is licensed {licence}: {restriction}.").format(
            model=card.get("title") or card.get("id"), licence=card.get("licence", "?"), restriction=licences.restriction(card))
            for card in pending) + " " + _("Use it only as its licence allows. Acknowledge and continue?")

    def acknowledgeLicence(self, modelId: str, accepted: bool = True, encoder: bool = False) -> bool:
        """When `accepted`, remember it for each card (the same file the command line reads); returns `accepted`."""
        from Med3DFMLib.registry import licences

        if accepted:
            for card in self.licenceCards(modelId, encoder):
                if licences.restriction(card) is not None:
                    licences.acknowledge(card, by="Slicer panel")
        return accepted

    def memoryCheck(self, volumeNode, modelId: str, onCpu: bool) -> Optional[Tuple[int, Optional[int], bool]]:
        """(bytes the segment job needs, bytes available or None, fits) for this volume and model; None if unknown."""
        entry = self.registryEntry(modelId)
        imageData = volumeNode.GetImageData() if volumeNode else None
        if not entry or imageData is None:
            return None
        return environment.memory_check(imageData.GetDimensions(), volumeNode.GetSpacing(), entry.get("input", {}), len(entry.get("labels", [])) + 1, onCpu)

    def lowerResolutionToFit(self, volumeNode, modelId: str, onCpu: bool) -> Optional[float]:
        """For a scan that will not fit in main memory: the factor (× the model's spacing) at which it would
        (`segment --lower-resolution`); None when it fits, when memory is unknown, or when nothing fits."""
        memory = self.memoryCheck(volumeNode, modelId, onCpu)
        if memory is None or memory[1] is None or memory[2]:
            return None
        entry = self.registryEntry(modelId) or {}
        imageData = volumeNode.GetImageData()
        return environment.lower_resolution_to_fit(imageData.GetDimensions(), volumeNode.GetSpacing(), entry.get("input", {}),
                                                   len(entry.get("labels", [])) + 1, onCpu, memory[1])

    # --- jobs ----------------------------------------------------------------------------------

    def _newJobFolder(self) -> Path:
        base = slicer.app.temporaryPath or tempfile.gettempdir()
        Path(base).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="Med3DFM-", dir=base))

    def _startJob(self, kind: str, volumeNode, build) -> "jobs.Job":
        """Write the volume into a new job folder, build the command (`build(folder, inputPath)` returns
        (command, context)) and start it; the folder is removed if anything fails before the start.
        A context "stopFile" makes Cancel ask the job to stop early (jobs.Job.stop_or_cancel)."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError(_("The input volume has no image data."))
        folder = self._newJobFolder()
        try:
            inputPath = folder / "input.nrrd"
            nodes.writeVolume(volumeNode, inputPath)
            command, context = build(folder, inputPath)
            job = jobs.Job(command, kind=kind, env=self.jobEnvironment(), cwd=str(folder), temp_dir=folder,
                           stop_file=context.pop("stopFile", None))
            job.context.update(volumeNode=volumeNode, **context)
            job.start()
        except Exception:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            raise
        logging.info("Med3DFM job: " + subprocess.list2cmdline(command))
        return job

    def _checkFinished(self, job: "jobs.Job") -> "jobs.JobResult":
        """The job's result, remembered for diagnostics; a cancelled or failed job raises Med3DFMJobError."""
        result = job.result()
        self.rememberJob(result)
        if result.cancelled:
            raise Med3DFMJobError(_("cancelled"), result.stderr)
        if not result.ok:
            raise Med3DFMJobError(result.error or _("the job failed"), result.stderr)
        return result

    @staticmethod
    def _runToEnd(job: "jobs.Job", finish, timeout: Optional[float]):
        """The synchronous form of a job: wait for it, finish it, always clean up."""
        try:
            job.wait(timeout=timeout)
            return finish(job)
        finally:
            job.cleanup()

    # --- segment -------------------------------------------------------------------------------

    def startSegment(self, volumeNode, modelId: str = DEFAULT_MODEL, device: str = "auto", outputSegmentationNode=None,
                     confidence: bool = False, flagBelow: float = CONFIDENCE_FLAG_BELOW, rawLabelNames: bool = False,
                     lowerResolution: float = 1.0) -> "jobs.Job":
        """Start a segment job in the background; poll it with job.poll(), then call finishSegment(job).

        A volume outside the model's declared domain is refused here (Med3DFMJobError naming the mismatch
        and the models that fit) before anything is written; the job checks again (without the DICOM tag).
        `confidence`: also a confidence overlay showing the voxels below `flagBelow`. `rawLabelNames`: segments
        named as the model card's labels, not by their terminology (`segment --raw-label-names`). `lowerResolution`:
        the model runs that many times coarser than its spacing (`segment --lower-resolution`), for a scan that
        would not fit in memory otherwise (lowerResolutionToFit).
        """
        message = fit.mismatch_message(modelId, self.modelFits(volumeNode))
        if message:
            raise Med3DFMJobError(message)

        def build(folder: Path, inputPath: Path):
            output = folder / "result.seg.nrrd"
            extra = {"labelmap": folder / "result-labels.nii.gz", "confidence": folder / "result-confidence.nii.gz", "flag_below": flagBelow} if confidence else {}
            command = jobs.segment_command(self.pythonExecutable(), inputPath, output, modelId, device, table=folder / "result.tsv", registry=None,
                                           raw_label_names=rawLabelNames, lower_resolution=lowerResolution, **extra)
            return command, {"modelId": modelId, "output": output, "outputSegmentationNode": outputSegmentationNode, "flagBelow": flagBelow,
                             "rawLabelNames": rawLabelNames, "lowerResolution": lowerResolution}

        return self._startJob("segment", volumeNode, build)

    def finishSegment(self, job: "jobs.Job", show3D: bool = False):
        """Turn a finished segment job's files into nodes: (segmentation node, table node), with `.report`
        (results.SegmentMerge: the segments replaced, added and kept)."""
        result = self._checkFinished(job)
        segmentResult = results.SegmentResult.from_outputs(result.outputs, job.context["output"])
        return self.loadSegmentResult(segmentResult, job.context["volumeNode"], job.context.get("outputSegmentationNode"), show3D,
                                      job.context.get("flagBelow", CONFIDENCE_FLAG_BELOW), job.context.get("rawLabelNames", False))

    def segment(self, volumeNode, modelId: str = DEFAULT_MODEL, device: str = "auto", outputSegmentationNode=None,
                show3D: bool = False, timeout: Optional[float] = None, confidence: bool = False, flagBelow: float = CONFIDENCE_FLAG_BELOW,
                rawLabelNames: bool = False):
        """Segment synchronously (scripts, tests): returns (segmentation node, table node), with `.report`
        (and `.confidence_node`, `.flags` with `confidence`)."""
        job = self.startSegment(volumeNode, modelId, device, outputSegmentationNode, confidence, flagBelow, rawLabelNames)
        return self._runToEnd(job, lambda finished: self.finishSegment(finished, show3D=show3D), timeout)

    def loadSegmentResult(self, segmentResult: "results.SegmentResult", volumeNode, outputSegmentationNode=None, show3D: bool = False,
                          flagBelow: float = CONFIDENCE_FLAG_BELOW, rawLabelNames: bool = False):
        loaded = slicer.util.loadSegmentation(str(segmentResult.segmentation))  # raises if it cannot
        nodes.forgetTemporaryFile(loaded)
        nodes.placeUnderInputTransform(volumeNode, loaded)  # before merging: Slicer resamples between the two frames
        modelText = f"{segmentResult.model_id}@{segmentResult.model_version}"
        entry = self.registryEntry(modelText)
        nodes.applySegmentDisplay(loaded, results.segment_display_info(entry, rawLabelNames) if entry else [])
        if outputSegmentationNode is not None and outputSegmentationNode is not loaded:
            # The user chose this node as the output: only the model's segments are replaced or added,
            # everything else in it (painted, imported, other models' results) stays as it is.
            try:
                report = nodes.mergeResultSegments(loaded, outputSegmentationNode, volumeNode)
            finally:
                slicer.mrmlScene.RemoveNode(loaded)
            segmentationNode = outputSegmentationNode
        else:
            segmentationNode = loaded
            segmentationNode.SetName(f"{volumeNode.GetName()} {segmentResult.model_id}")
            segmentation = loaded.GetSegmentation()
            report = results.SegmentMerge(added=[segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                                          segment_ids=nodes.segmentIds(segmentation))
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.CreateDefaultDisplayNodes()
        if show3D:
            segmentationNode.CreateClosedSurfaceRepresentation()

        tableNode = nodes.loadTable(segmentResult, f"{volumeNode.GetName()} {segmentResult.model_id} volumes") if segmentResult.table else None
        for node in (segmentationNode, tableNode):
            if node is not None:
                nodes.tagProvenance(node, segmentResult.provenance, modelText)
        confidenceNode, flags = None, ""
        if segmentResult.confidence is not None:
            confidenceNode = nodes.loadConfidence(segmentResult.confidence, volumeNode, f"{volumeNode.GetName()} {segmentResult.model_id} confidence", flagBelow)
            nodes.tagProvenance(confidenceNode, segmentResult.provenance, modelText)
            confidenceMap = segmentResult.confidence_map()
            self._confidenceMaps[confidenceNode.GetID()] = confidenceMap
            while len(self._confidenceMaps) > KEPT_CONFIDENCE_MAPS:  # each holds two volumes in memory
                self._confidenceMaps.pop(next(iter(self._confidenceMaps)))
            flags = confidenceMap.flags(flagBelow)[1]
        nodes.placeBesideInput(volumeNode, [segmentationNode, tableNode] + ([confidenceNode] if confidenceNode is not None else []))
        return results.SegmentOutputs(segmentationNode, tableNode, report, confidenceNode, flags)

    def flagLowConfidence(self, confidenceNode, flagBelow: float) -> str:
        """Show only the voxels below `flagBelow` on a confidence overlay and say which segments hold them."""
        confidenceMap = self._confidenceMaps.get(confidenceNode.GetID()) if confidenceNode is not None else None
        if confidenceMap is None:
            raise Med3DFMJobError(_("No confidence overlay from this session: run Segment with the confidence overlay on."))
        nodes.setConfidenceThreshold(confidenceNode, flagBelow)
        return confidenceMap.flags(flagBelow)[1]

    # --- classify and explain -------------------------------------------------------------------

    def exportRegion(self, volumeNode, segmentationNode, path: Path) -> "results.PaintedLabels":
        """The visible segments of `segmentationNode` as one region (.seg.nrrd on the volume's geometry)."""
        try:
            region = results.region_labels(nodes.paintedSegments(volumeNode, segmentationNode))
        except ValueError as err:
            raise Med3DFMJobError(str(err)) from None
        results.write_painted_segmentation(path, region, nodes.ijkToRasArray(volumeNode))
        return region

    def startClassify(self, volumeNode, modelId: str, roiSegmentationNode=None, heatmapMethod: Optional[str] = "attention",
                      device: str = "auto", prevalence: str = "") -> "jobs.Job":
        """Start `classify` in the background (optionally inside the visible segments of a segmentation,
        optionally with a heatmap, optionally adjusted to the expected share of the classes, e.g.
        "mass=0.2"); poll job.poll(), then finishClassify(job)."""
        if not modelId:
            raise ValueError(_("Choose a classification adapter (import one in the Models section)."))
        jobs.parse_prevalence_text(prevalence)  # a typing slip is named before the volume is exported

        def build(folder: Path, inputPath: Path):
            roi = None
            if roiSegmentationNode is not None:
                roi = folder / "region.seg.nrrd"
                self.exportRegion(volumeNode, roiSegmentationNode, roi)
            table = folder / "result.tsv"
            heatmap = folder / "heatmap.nrrd" if heatmapMethod else None
            command = jobs.classify_command(self.pythonExecutable(), inputPath, table, modelId, device, roi=roi, heatmap=heatmap,
                                            heatmap_method=heatmapMethod or "attention", prevalence=prevalence)
            return command, {"modelId": modelId, "table": table}

        return self._startJob("classify", volumeNode, build)

    def finishClassify(self, job: "jobs.Job") -> Dict[str, Any]:
        """Table node of class probabilities (+ heatmap overlay when asked): {"result", "tableNode", "heatmapNode"}."""
        result = self._checkFinished(job)
        classified = results.ClassifyResult.from_outputs(result.outputs, job.context["table"])
        volumeNode = job.context["volumeNode"]
        tableNode = nodes.tableFromColumns(f"{volumeNode.GetName()} {classified.model_id} classes", classified.table_columns())
        nodes.tagProvenance(tableNode, json.dumps(classified.record, sort_keys=True), f"{classified.model_id}@{classified.model_version}")
        heatmapNode = None
        if classified.heatmap is not None:
            heatmapNode = nodes.loadHeatmap(classified.heatmap, volumeNode, f"{volumeNode.GetName()} {classified.model_id} heatmap ({classified.heatmap.title()})")
        nodes.placeBesideInput(volumeNode, [tableNode, heatmapNode])
        return {"result": classified, "tableNode": tableNode, "heatmapNode": heatmapNode}

    def classify(self, volumeNode, modelId: str, roiSegmentationNode=None, heatmapMethod: Optional[str] = "attention",
                 device: str = "auto", timeout: Optional[float] = None, prevalence: str = "") -> Dict[str, Any]:
        """Classify synchronously (scripts, tests); see finishClassify for what it returns."""
        return self._runToEnd(self.startClassify(volumeNode, modelId, roiSegmentationNode, heatmapMethod, device, prevalence), self.finishClassify, timeout)

    def startExplain(self, volumeNode, modelId: str, target: str, method: str = "gradcam", device: str = "auto") -> "jobs.Job":
        """Start `explain` (a heatmap of one segment of any segmentation model or adapter) in the background."""

        def build(folder: Path, inputPath: Path):
            heatmap = folder / "heatmap.nrrd"
            command = jobs.explain_command(self.pythonExecutable(), inputPath, heatmap, modelId, target, method, device)
            return command, {"modelId": modelId, "heatmap": heatmap, "target": target}

        return self._startJob("explain", volumeNode, build)

    def finishExplain(self, job: "jobs.Job"):
        """The heatmap of a finished explain job as an overlay on its input; returns the volume node."""
        result = self._checkFinished(job)
        heatmap = results.HeatmapResult.from_file(Path(result.outputs.get("heatmap") or job.context["heatmap"]))
        volumeNode = job.context["volumeNode"]
        heatmapNode = nodes.loadHeatmap(heatmap, volumeNode, f"{volumeNode.GetName()} {job.context['modelId']} heatmap ({heatmap.title()})")
        nodes.placeBesideInput(volumeNode, [heatmapNode])
        return heatmapNode

    def explain(self, volumeNode, modelId: str, target: str, method: str = "gradcam", device: str = "auto",
                timeout: Optional[float] = None):
        """Explain synchronously (scripts, tests): the heatmap volume node."""
        return self._runToEnd(self.startExplain(volumeNode, modelId, target, method, device), self.finishExplain, timeout)

    # --- learn from labels: this scan ------------------------------------------------------------

    def exportPaintedLabels(self, volumeNode, segmentationNode, path: Path, segmentIds: Optional[List[str]] = None) -> "results.PaintedLabels":
        """The painted segments as one .seg.nrrd on the volume's geometry (what `adapt --labels` reads)."""
        try:
            painted = results.painted_labels(nodes.paintedSegments(volumeNode, segmentationNode, segmentIds))
        except ValueError as err:
            raise Med3DFMJobError(str(err)) from None
        results.write_painted_segmentation(path, painted, nodes.ijkToRasArray(volumeNode))
        return painted

    def checkAdapterName(self, name: str) -> str:
        """The adapter id for `name`; refuses names that would shadow a built-in model."""
        if not name or not name.strip():
            raise Med3DFMJobError(_("Give the new structure a name."))
        adapterId = results.adapter_id(name)
        if any(entry.get("id") == adapterId for entry in self.registryModels()):
            raise Med3DFMJobError(_("'{name}' is the name of a built-in model; choose another name.").format(name=name))
        return adapterId

    def startLearnFromLabels(self, volumeNode, segmentationNode, name: str, mode: str = "adapter", device: str = "auto",
                             segmentIds: Optional[List[str]] = None) -> "jobs.Job":
        """Start `adapt` in the background on the painted segments; poll job.poll(), then finishLearnFromLabels(job)."""
        if segmentationNode is None:
            raise ValueError(_("Choose the segmentation that holds the painted segments."))
        self.checkAdapterName(name)

        def build(folder: Path, inputPath: Path):
            labelsPath = folder / "painted.seg.nrrd"
            painted = self.exportPaintedLabels(volumeNode, segmentationNode, labelsPath, segmentIds)
            adapter = folder / results.adapter_file_name(name)
            output = folder / "learned.seg.nrrd"
            command = jobs.adapt_command(self.pythonExecutable(), inputPath, labelsPath, name.strip(), adapter, mode, device, segment=output)
            return command, {"segmentationNode": segmentationNode, "name": name.strip(), "mode": mode, "adapter": adapter,
                             "output": output, "structures": painted.structures, "skipped": painted.skipped}

        return self._startJob("adapt", volumeNode, build)

    def finishLearnFromLabels(self, job: "jobs.Job") -> Dict[str, Any]:
        """Keep the adapter, put the learned segments into the painted node, attach the record.

        Returns {"adapter": path of the kept adapter, "record": the job record, "segmentIds": updated
        or added segment ids, "segmentationNode": the painted node}.
        """
        result = self._checkFinished(job)
        adapter, record = results.keep_adapter(Path(result.outputs.get("adapter") or job.context["adapter"]), self.adaptersFolder())

        segmentationNode = job.context["segmentationNode"]
        volumeNode = job.context["volumeNode"]
        output = Path(result.outputs.get("segmentation") or job.context["output"])
        report = nodes.applyLearnedSegments(output, volumeNode, segmentationNode, record.get("adapter", {}).get("classes") or job.context["structures"])
        nodes.tagProvenance(segmentationNode, json.dumps(record, sort_keys=True), str(record.get("adapter", {}).get("id", "")))
        segmentationNode.SetAttribute(results.ADAPTER_ATTRIBUTE, str(adapter))
        return {"adapter": adapter, "record": record, "segmentIds": report.segment_ids, "report": report, "segmentationNode": segmentationNode}

    def learnFromLabels(self, volumeNode, segmentationNode, name: str, mode: str = "adapter", device: str = "auto",
                        save: bool = True, timeout: Optional[float] = None, segmentIds: Optional[List[str]] = None) -> Path:
        """Learn structures from a few painted slices, synchronously (scripts, tests).

        Learns from the visible segments of `segmentationNode` (or `segmentIds`); a segment named
        "background" marks explicit negatives. The painted structures are replaced by the full 3D
        result; background and other segments stay. Returns the adapter file: its copy in the model
        folder when `save` (then usable by Segment), else the kept copy in adaptersFolder().
        """
        job = self.startLearnFromLabels(volumeNode, segmentationNode, name, mode, device, segmentIds)
        learned = self._runToEnd(job, self.finishLearnFromLabels, timeout)
        return self.saveAdapter(learned["adapter"]) if save else learned["adapter"]

    # --- learn from labels: other patients -------------------------------------------------------

    def buildOtherPatientsCommand(self, folder: Path, pairs: List[Tuple[Any, Any]], name: str,
                                  budgetMinutes: float = jobs.BUDGET_MINUTES_DEFAULT, device: str = "auto",
                                  firstImage: Optional[Path] = None) -> Tuple[List[str], Dict[str, Any]]:
        """Write each labelled volume and its segmentation (visible segments, whole-volume labels) into
        `folder`; the `adapt --mode decoder --dense --budget-minutes` command and the job context.
        `firstImage`: where the first volume has been written already."""
        folder = Path(folder)
        labelled, files = [], []
        for index, (volumeNode, segmentationNode) in enumerate(pairs, start=1):
            if volumeNode is None or segmentationNode is None or volumeNode.GetImageData() is None:
                raise ValueError(_("Labelled volume {index}: choose a volume with image data and its segmentation.").format(index=index))
            image = firstImage if index == 1 and firstImage is not None else folder / f"image-{index}.nrrd"
            if image != firstImage:
                nodes.writeVolume(volumeNode, image)
            labelsPath = folder / f"labels-{index}.seg.nrrd"
            painted = self.exportPaintedLabels(volumeNode, segmentationNode, labelsPath)
            labelled.append((f"{volumeNode.GetName()} ({segmentationNode.GetName()})", painted.structures))
            files.append((image, labelsPath))
        try:
            structures = results.common_structures(labelled)
        except ValueError as err:
            raise Med3DFMJobError(str(err)) from None
        adapter = folder / results.adapter_file_name(name)
        command = jobs.decoder_adapt_command(self.pythonExecutable(), files, name.strip(), adapter, budgetMinutes, device)
        return command, {"name": name.strip(), "mode": "decoder", "adapter": adapter, "structures": structures,
                         "volumes": len(files), "budgetMinutes": float(budgetMinutes), "stopFile": jobs.stop_file_for(adapter)}

    def startLearnFromOtherPatients(self, pairs: List[Tuple[Any, Any]], name: str, budgetMinutes: float = jobs.BUDGET_MINUTES_DEFAULT,
                                    device: str = "auto") -> "jobs.Job":
        """Start `adapt --mode decoder` on labelled volumes ((volume node, segmentation node) pairs, the
        same structure names in each) for `budgetMinutes`; poll job.poll(), then finishLearnFromOtherPatients(job).
        job.stop_or_cancel() (Cancel) ends training early and keeps the best model so far."""
        pairs = list(pairs or [])
        if not pairs:
            raise ValueError(_("Add at least one labelled volume (a volume and the segmentation with its structures)."))
        self.checkAdapterName(name)

        def build(folder: Path, inputPath: Path):
            return self.buildOtherPatientsCommand(folder, pairs, name, budgetMinutes, device, firstImage=inputPath)

        return self._startJob(jobs.DECODER_KIND, pairs[0][0], build)

    def finishLearnFromOtherPatients(self, job: "jobs.Job") -> Dict[str, Any]:
        """Keep the trained model (a job stopped by Cancel still wrote its best one) in adaptersFolder().
        Returns {"adapter": the kept file, "record": the job record, "stoppedEarly": bool}; Save as model
        (saveAdapter) makes it a Segment model for any volume."""
        result = self._checkFinished(job)
        adapter, record = results.keep_adapter(Path(result.outputs.get("adapter") or job.context["adapter"]), self.adaptersFolder())
        return {"adapter": adapter, "record": record, "stoppedEarly": results.stopped_early(record)}

    @staticmethod
    def otherPatientsStatus(learned: Dict[str, Any]) -> str:
        """The panel's status line for a finished other-patients job (finishLearnFromOtherPatients' result)."""
        text = _("Done: {summary}.").format(summary=results.training_summary(learned["record"]))
        if learned["stoppedEarly"]:
            text += " " + _("Stopped early: the best model so far was kept.")
        return text + " " + _("To apply it, click Save as model, then choose '{id}' in the Segment section and segment "
                              "any volume.").format(id=learned["record"].get("adapter", {}).get("id", ""))

    def learnFromOtherPatients(self, pairs: List[Tuple[Any, Any]], name: str, budgetMinutes: float = jobs.BUDGET_MINUTES_DEFAULT,
                               device: str = "auto", save: bool = True, timeout: Optional[float] = None) -> Path:
        """Train on labelled volumes synchronously (scripts, tests); the adapter file (in the model folder when `save`)."""
        job = self.startLearnFromOtherPatients(pairs, name, budgetMinutes, device)
        learned = self._runToEnd(job, self.finishLearnFromOtherPatients, timeout)
        return self.saveAdapter(learned["adapter"]) if save else learned["adapter"]

    # --- models --------------------------------------------------------------------------------

    def _runModelsCommand(self, action: str, arguments: List[str], timeout: float = 120) -> subprocess.CompletedProcess:
        command = jobs.models_command(self.pythonExecutable(), action, arguments)
        completed, self.lastJob = jobs.run_to_end(command, env=self.jobEnvironment(), timeout=timeout)
        if completed.returncode != 0:
            raise Med3DFMJobError(self.lastJob["error"], completed.stderr)
        return completed

    def listModels(self, allVersions: bool = False) -> List[Dict[str, Any]]:
        """`models list --json [--all-versions]`, run as a job (the registry code stays out of Slicer's process)."""
        return json.loads(self._runModelsCommand("list", ["--all-versions"] if allVersions else []).stdout)

    def removeModel(self, spec: str) -> None:
        self._runModelsCommand("remove", [spec])

    def startModelsJob(self, action: str, arguments: List[str]) -> "jobs.Job":
        """`models download|import ...` in the background, with progress; poll like a segment job."""
        command = jobs.models_command(self.pythonExecutable(), action, arguments)
        return jobs.Job(command, kind="models", env=self.jobEnvironment()).start()

    def adapterImportArguments(self, adapter: Path) -> List[str]:
        """Make room for a new copy of a learned adapter in the model folder; the `models import` arguments.

        Every learned adapter has version 1.0.0, so a copy saved earlier under the same name is removed
        first (the library refuses to overwrite a different file of the same id@version).
        """
        adapterId = results.adapter_id(Path(adapter).name[: -len(".safetensors")])
        for entry in results.installed_models(self.modelsFolder(), task="adapter"):
            if entry.get("id") == adapterId:
                self._runModelsCommand("remove", [f"{entry['id']}@{entry['version']}"])
        return [str(adapter)]

    def saveAdapter(self, adapter: Path) -> Path:
        """Install a learned adapter into the model folder (`models import`), listed beside the built-in models."""
        completed = self._runModelsCommand("import", self.adapterImportArguments(adapter))
        path = jobs.imported_model_path(completed.stdout)
        if path is None:
            raise Med3DFMJobError(_("the adapter was not imported"), completed.stdout + completed.stderr)
        return path
