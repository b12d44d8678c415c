"""The GUI half of `slicer` that the Logic stand-in (slicer_standin.py) leaves out, for the panel.

- An observable scene (NodeAddedEvent, NodeRemovedEvent, StartCloseEvent, EndCloseEvent, GetNodeByID,
  singleton nodes) and a vtkMRMLScriptedModuleNode with string parameters, node references, ModifiedEvent
  and StartModify/EndModify, as Libs/MRML/Core/vtkMRMLScriptedModuleNode.cxx has them (a parameter set to
  the value it has already does not modify the node).
- parameterNodeWrapper (Base/Python/slicer/parameterNodeWrapper): typed parameters with defaults, the
  Default/Choice/WithinRange annotations and their validation, and the GUI connectors for the widget
  types the module binds (connectParametersToGui -> tag, disconnectGui(tag)); a widget type Slicer has no
  connector for is refused, as in Slicer.
- slicer.util's loadUI, childWidgetVariables, findChildren, VTKObservationMixin, NodeModify,
  tryWithErrorDisplay and the message displays, ported from Base/Python/slicer/util.py, so that a message
  goes through ctkMessageBox as in Slicer outside testing mode (there it is recorded; see widgets.py).
- ScriptedLoadableModuleWidget and ScriptedLoadableModuleLogic as in Base/Python/slicer/ScriptedLoadableModule.py
  (the panel's layout, resourcePath, the module's singleton parameter node).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import typing
from typing import Any, Callable, Dict, List, Optional

import vtk

import slicer_standin
from slicer_standin import Node, Scene

from . import widgets
from .pythonqt import lookup as qt_class


def _event_key(event):
    """VTK events by name ("ModifiedEvent"; VTK passes the name to callbacks), MRML's own by number."""
    if isinstance(event, str):
        return event
    return vtk.vtkCommand.GetStringFromEventId(event) if event < vtk.vtkCommand.UserEvent else int(event)


class Observable:
    """AddObserver/RemoveObserver/InvokeEvent with VTK's callback signature: callback(caller, eventName);
    a callback with a CallDataType attribute (vtk.calldata_type) also gets the call data."""

    _tags = itertools.count(1)

    def _observers(self) -> Dict[int, Any]:
        if "_observer_table" not in self.__dict__:
            self.__dict__["_observer_table"] = {}
        return self.__dict__["_observer_table"]

    def AddObserver(self, event, callback: Callable, priority: float = 0.0) -> int:
        tag = next(Observable._tags)
        self._observers()[tag] = (_event_key(event), callback, priority)
        return tag

    def RemoveObserver(self, tag: int) -> None:
        self._observers().pop(tag, None)

    def HasObserver(self, event) -> bool:
        return any(key == _event_key(event) for key, _c, _p in self._observers().values())

    def InvokeEvent(self, event, callData: Any = None) -> None:
        key = _event_key(event)
        name = key if isinstance(key, str) else str(key)
        for _tag, (observed, callback, _priority) in sorted(self._observers().items(), key=lambda item: -item[1][2]):
            if observed == key and _tag in self._observers():
                if hasattr(callback, "CallDataType"):
                    callback(self, name, callData)
                else:
                    callback(self, name)


class vtkMRMLScriptedModuleNode(slicer_standin.vtkMRMLScriptedModuleNode, Observable):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._parameters: Dict[str, str] = {}
        self._references: Dict[str, Optional[str]] = {}
        self._singletonTag: Optional[str] = None
        self._disableModified = 0
        self._modifiedWhileDisabled = False

    # parameters (strings) and node references, as vtkMRMLScriptedModuleNode / vtkMRMLNode have them
    def SetParameter(self, name: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"SetParameter({name!r}, ...) takes a string, not {type(value).__name__}")
        if self._parameters.get(name) != value:
            self._parameters[name] = value
            self.Modified()

    def GetParameter(self, name: str) -> str:
        return self._parameters.get(name, "")

    def HasParameter(self, name: str) -> bool:
        return name in self._parameters

    def UnsetParameter(self, name: str) -> None:
        if self._parameters.pop(name, None) is not None:
            self.Modified()

    def GetParameterNames(self) -> List[str]:
        return list(self._parameters)

    def SetNodeReferenceID(self, role: str, nodeID: Optional[str]) -> None:
        if self._references.get(role) != (nodeID or None):
            self._references[role] = nodeID or None
            self.Modified()

    def GetNodeReferenceID(self, role: str) -> Optional[str]:
        return self._references.get(role)

    def GetNodeReference(self, role: str):
        nodeID = self._references.get(role)
        return self.scene.GetNodeByID(nodeID) if nodeID and self.scene is not None else None

    def RemoveNodeReferenceIDs(self, role: str) -> None:
        if self._references.pop(role, None) is not None:
            self.Modified()

    def SetSingletonTag(self, tag: str) -> None:
        self._singletonTag = tag

    def GetSingletonTag(self) -> Optional[str]:
        return self._singletonTag

    # modification
    def StartModify(self) -> int:
        previous = self._disableModified
        self._disableModified = 1
        return previous

    def EndModify(self, previous: int) -> int:
        self._disableModified = previous
        if not previous and self._modifiedWhileDisabled:
            self._modifiedWhileDisabled = False
            self.InvokeEvent(vtk.vtkCommand.ModifiedEvent)
        return previous

    def Modified(self) -> None:
        if self._disableModified:
            self._modifiedWhileDisabled = True
        else:
            self.InvokeEvent(vtk.vtkCommand.ModifiedEvent)

    def UnRegister(self, _owner: Any) -> None:
        pass


class ObservableScene(Scene, Observable):
    """The stand-in scene with the events and look-ups the panel's widgets need."""

    NODE_CLASSES = {**Scene.NODE_CLASSES, "vtkMRMLScriptedModuleNode": vtkMRMLScriptedModuleNode}
    NodeAddedEvent = 66001
    NodeRemovedEvent = 66003
    StartCloseEvent = 66004
    EndCloseEvent = 66005

    _deferred: Optional[List[Node]] = None

    def AddNode(self, node: Node) -> Node:
        super().AddNode(node)
        if self._deferred is not None:
            self._deferred.append(node)
        else:
            self.InvokeEvent(self.NodeAddedEvent, node)
        return node

    @contextlib.contextmanager
    def reading(self):
        """Slicer's readers fill a node before they add it (vtkSlicerVolumesLogic::AddArchetypeVolume: ReadData,
        then AddNode); the stand-in's add it first: NodeAddedEvent waits until the node is read."""
        outer = self._deferred
        self._deferred = []
        try:
            yield
        finally:
            added, self._deferred = self._deferred, outer
            for node in added:
                if outer is not None:
                    outer.append(node)
                elif node.scene is self:
                    self.InvokeEvent(self.NodeAddedEvent, node)

    def RemoveNode(self, node: Node) -> None:
        super().RemoveNode(node)
        node.scene = None
        self.InvokeEvent(self.NodeRemovedEvent, node)

    def GetNodeByID(self, nodeID: Optional[str]):
        return next((n for n in self.nodes if n.GetID() == nodeID), None) if nodeID else None

    def GetSingletonNode(self, tag: str, className: str):
        return next((n for n in self.nodes if type(n).__name__ == className and getattr(n, "_singletonTag", None) == tag), None)

    def GetNodesByClass(self, className: str) -> List[Node]:
        return [n for n in self.nodes if any(c.__name__ == className for c in type(n).__mro__)]

    def GenerateUniqueName(self, name: str) -> str:
        names = {n.GetName() for n in self.nodes}
        return name if name not in names else next(f"{name}_{i}" for i in itertools.count(1) if f"{name}_{i}" not in names)

    def Clear(self, removeSingletons: int = 0) -> None:
        """File > Close Scene: StartCloseEvent, the nodes go (singletons stay unless asked), EndCloseEvent."""
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self.nodes):
            if removeSingletons or getattr(node, "_singletonTag", None) is None:
                self.RemoveNode(node)
        self.InvokeEvent(self.EndCloseEvent)


# --- parameterNodeWrapper -----------------------------------------------------------------------

class Default:
    def __init__(self, value) -> None:
        self.value = value


class Validator:
    def validate(self, value) -> None:
        raise NotImplementedError


class Choice(Validator):
    def __init__(self, choices) -> None:
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange(Validator):
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


def _is_node_type(datatype) -> bool:
    return isinstance(datatype, type) and issubclass(datatype, Node)


class _Parameter:
    """One typed parameter: the serializers of parameterNodeWrapper/serializers.py for bool, int, float,
    str and MRML nodes, with their NotNone/IsInstance checks and the annotated validators."""

    def __init__(self, name: str, hint) -> None:
        self.name = name
        base, annotations = hint, []
        if typing.get_origin(hint) is typing.Annotated:
            base, *annotations = typing.get_args(hint)
        if base not in (bool, int, float, str) and not _is_node_type(base):
            raise Exception(f"Unable to create serializer for member {name} of type {base}")
        self.type = base
        defaults = [a for a in annotations if isinstance(a, Default)]
        self.validators = [a for a in annotations if isinstance(a, Validator)]
        unused = [a for a in annotations if not isinstance(a, (Default, Validator))]
        if unused:
            logging.warning(f"Unused annotations: {unused}")
        self.default = defaults[0].value if defaults else {bool: False, int: 0, float: 0.0, str: ""}.get(base)

    @property
    def is_node(self) -> bool:
        return _is_node_type(self.type)

    def validate(self, value) -> None:
        if self.is_node:
            if value is not None and not isinstance(value, self.type):
                raise TypeError(f"Value must be of type '{self.type}', is type '{type(value)}' value '{value}'")
        else:
            if value is None:
                raise ValueError("Value must not be None")
            allowed = (int, float) if self.type is float else self.type
            if not isinstance(value, allowed):
                raise TypeError(f"Value must be of type '{allowed}', is type '{type(value)}' value '{value}'")
        for validator in self.validators:
            validator.validate(value)

    def write(self, node, value) -> None:
        self.validate(value)
        if self.is_node:
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        if self.is_node:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "True"
        return self.type(text) if self.type is not str else text


# GUI connectors (parameterNodeWrapper/guiConnectors.py): widget type (exact, as Slicer checks it) and datatype

class _Connector:
    signal = ""

    def __init__(self, widget, parameter: _Parameter) -> None:
        self.widget = widget
        self.parameter = parameter
        self._callback = None

    def onChanged(self, callback) -> None:
        signal = getattr(self.widget, self.signal)
        if self._callback is not None:
            signal.disconnect(self._changed)
        self._callback = callback
        if callback is not None:
            signal.connect(self._changed)

    def _changed(self, *args) -> None:
        if self._callback:
            self._callback()


class _CheckBoxConnector(_Connector):
    signal = "stateChanged"

    def read(self):
        return self.widget.checked

    def write(self, value) -> None:
        self.widget.checked = value


class _NumberConnector(_Connector):
    signal = "valueChanged"

    def __init__(self, widget, parameter) -> None:
        super().__init__(widget, parameter)
        if parameter.type is int:
            widget.decimals = 0
        ranges = [v for v in parameter.validators if isinstance(v, WithinRange)]
        if ranges:
            widget.minimum, widget.maximum = ranges[0].minimum, ranges[0].maximum
        else:
            widget.minimum, widget.maximum = float("-inf"), float("inf")

    def read(self):
        return int(self.widget.value) if self.parameter.type is int else self.widget.value

    def write(self, value) -> None:
        self.widget.value = value


class _LineEditConnector(_Connector):
    signal = "textChanged"

    def read(self):
        return self.widget.text

    def write(self, value) -> None:
        if value != self.widget.text:
            self.widget.text = value


class _NodeComboBoxConnector(_Connector):
    signal = "currentNodeChanged"

    def __init__(self, widget, parameter) -> None:
        super().__init__(widget, parameter)
        widget.nodeTypes = [parameter.type.__name__]

    def read(self):
        return self.widget.currentNode()

    def write(self, value) -> None:
        self.widget.setCurrentNode(value)


def _connector(widget, parameter: _Parameter) -> _Connector:
    kind = type(widget)
    if kind is qt_class("QCheckBox") and parameter.type is bool:
        return _CheckBoxConnector(widget, parameter)
    if kind in (qt_class("QDoubleSpinBox"),) and parameter.type in (float, int):
        return _NumberConnector(widget, parameter)
    if kind in (qt_class("QSpinBox"), qt_class("QSlider")) and parameter.type is int:
        return _NumberConnector(widget, parameter)
    if kind is qt_class("QLineEdit") and parameter.type is str:
        return _LineEditConnector(widget, parameter)
    if kind is widgets.qMRMLNodeComboBox and parameter.is_node:
        return _NodeComboBoxConnector(widget, parameter)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{parameter.type}' to widget type '{kind}'.")


class _WrapperBase:
    """What parameterNodeWrapper adds to the decorated class (wrapper.py: _processClass)."""

    allParameters: Dict[str, _Parameter] = {}

    def __init__(self, parameterNode, prefix: Optional[str] = None) -> None:
        self.parameterNode = parameterNode
        self._parameterGUIs: Dict[int, Dict[str, _Connector]] = {}
        self._nextTag = 0
        self._guiObserverTags: Dict[int, int] = {}
        self._updatingGUIFromParameterNode = False
        for parameter in self.allParameters.values():
            if not parameterNode.HasParameter(parameter.name):
                parameter.write(parameterNode, parameter.default)

    def _check(self, name: str) -> _Parameter:
        if name not in self.allParameters:
            raise ValueError(f"Cannot find a param with the given name: {name}")
        return self.allParameters[name]

    def getValue(self, name: str):
        return self._check(name).read(self.parameterNode)

    def setValue(self, name: str, value) -> None:
        with NodeModify(self.parameterNode):
            self._check(name).write(self.parameterNode, value)

    def default(self, name: str) -> Default:
        return Default(self._check(name).default)

    def isCached(self, name: str) -> bool:
        self._check(name)
        return True

    def connectParametersToGui(self, mapping: Dict[str, Any]) -> int:
        connectors = {name: _connector(widget, self._check(name)) for name, widget in mapping.items()}
        tag = self._nextTag
        self._nextTag += 1
        self._parameterGUIs[tag] = connectors
        for name, connector in connectors.items():
            connector.write(self.getValue(name))
            connector.onChanged(self._guiToParameter(name, connector))
        self._guiObserverTags[tag] = self.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: self._updateGUIFromParameterNode())
        return tag

    def connectGui(self, gui) -> int:
        mapping = {}
        for widget in gui.__dict__.values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                mapping[str(name)] = widget
        return self.connectParametersToGui(mapping)

    def _guiToParameter(self, name: str, connector: _Connector):
        def callback():
            with NodeModify(self.parameterNode):
                if not self._updatingGUIFromParameterNode:
                    self.setValue(name, connector.read())

        return callback

    def _updateGUIFromParameterNode(self) -> None:
        if self._updatingGUIFromParameterNode:
            return
        try:
            self._updatingGUIFromParameterNode = True
            with NodeModify(self.parameterNode):
                for connectors in self._parameterGUIs.values():
                    for name, connector in connectors.items():
                        connector.write(self.getValue(name))
        finally:
            self._updatingGUIFromParameterNode = False

    def disconnectGui(self, tag) -> None:
        if tag in self._parameterGUIs:
            for connector in self._parameterGUIs.pop(tag).values():
                connector.onChanged(None)
        if tag in self._guiObserverTags:
            self.RemoveObserver(self._guiObserverTags.pop(tag))

    def StartModify(self) -> int:
        return self.parameterNode.StartModify()

    def EndModify(self, wasModified: int) -> int:
        return self.parameterNode.EndModify(wasModified)

    def AddObserver(self, event, callback, priority: float = 0.0) -> int:
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag: int) -> None:
        self.parameterNode.RemoveObserver(tag)

    def Modified(self) -> None:
        self.parameterNode.Modified()


def parameterNodeWrapper(classtype=None):
    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        parameters = {name: _Parameter(name, hint) for name, hint in hints.items()}
        for name, parameter in parameters.items():
            if name in cls.__dict__:
                parameter.default = cls.__dict__[name]
        namespace = {name: property(lambda self, n=name: self.getValue(n), lambda self, value, n=name: self.setValue(n, value))
                     for name in parameters}
        namespace["allParameters"] = parameters
        own = {key: value for key, value in cls.__dict__.items() if key not in ("__dict__", "__weakref__", "__annotations__", "__init__") and key not in parameters}
        return type(cls.__name__, (_WrapperBase,), {**own, **namespace})

    return wrap if classtype is None else wrap(classtype)


# --- slicer.util, the GUI part (ported from Base/Python/slicer/util.py) ----------------------------

class NodeModify:
    def __init__(self, node) -> None:
        self.node = node

    def __enter__(self):
        self.wasModifying = self.node.StartModify()
        return self.node

    def __exit__(self, *exc) -> None:
        self.node.EndModify(self.wasModifying)


class VTKObservationMixin:
    def __init__(self) -> None:
        super().__init__()
        self.__observations: Dict[Any, Dict[Any, Dict[Any, Any]]] = {}

    @property
    def Observations(self):
        return [(obj, event, method, group, tag, priority) for obj, events in self.__observations.items()
                for event, methods in events.items() for method, (group, tag, priority) in methods.items()]

    def removeObservers(self, method=None) -> None:
        if method is None:
            for obj, _e, _m, _g, tag, _p in self.Observations:
                obj.RemoveObserver(tag)
            self.__observations.clear()
        else:
            for obj, events in self.__observations.items():
                for _e, methods in events.items():
                    if method in methods:
                        _g, tag, _p = methods.pop(method)
                        obj.RemoveObserver(tag)

    def addObserver(self, obj, event, method, group="none", priority=0.0) -> None:
        from warnings import warn

        methods = self.__observations.setdefault(obj, {}).setdefault(event, {})
        if method in methods:
            warn("already has observer")
            return
        methods[method] = group, obj.AddObserver(event, method, priority), priority

    def removeObserver(self, obj, event, method) -> None:
        from warnings import warn

        try:
            _group, tag, _priority = self.__observations[obj][event].pop(method)
            obj.RemoveObserver(tag)
        except KeyError:
            warn("does not have observer")

    def hasObserver(self, obj, event, method) -> bool:
        return method in self.__observations.get(obj, {}).get(event, {})


def loadUI(path):
    import qt

    qfile = qt.QFile(path)
    if not qfile.exists():
        raise RuntimeError("Could not load UI file: file not found " + str(path) + "\n\n")
    qfile.open(qt.QFile.ReadOnly)
    loader = qt.QUiLoader()
    widget = loader.load(qfile)
    if not widget:
        raise RuntimeError("Could not load UI file: " + str(path) + "\n\n")
    return widget


def findChildren(widget=None, name="", text="", title="", className=""):
    import fnmatch

    if not widget:
        widget = mainWindow()
    if not widget:
        return []
    children = []
    parents = [widget]
    kwargs = {"name": name, "text": text, "title": title, "className": className}
    expected = [key for key, value in kwargs.items() if value]
    while parents:
        p = parents.pop()
        if not p or not hasattr(p, "children"):
            continue
        parents += p.children()
        matched = 0
        for attribute in expected:
            if hasattr(p, attribute):
                value = getattr(p, attribute)
                if attribute == "className":
                    value = value()
                if isinstance(value, str) and fnmatch.fnmatchcase(value, kwargs[attribute]):
                    matched += 1
        if matched == len(expected):
            children.append(p)
    return children


def childWidgetVariables(widget):
    ui = type("", (), {})()
    for childWidget in findChildren(widget):
        if hasattr(childWidget, "name") and childWidget.name:
            setattr(ui, childWidget.name, childWidget)
    return ui


_main_window = None


def mainWindow():
    return _main_window


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs) -> None:
    logging.info(message)


def _messageDisplay(logLevel, text, testingReturnValue, mainWindowNeeded=False, parent=None, windowTitle=None, **kwargs):
    import slicer

    logging.log(logLevel, text)
    if not windowTitle:
        windowTitle = slicer.app.applicationName + " " + logging.getLevelName(logLevel).lower()
    if slicer.app.testingEnabled():
        return testingReturnValue
    if mainWindowNeeded and mainWindow() is None:
        return None
    return messageBox(text, parent=parent, windowTitle=windowTitle, **kwargs)


def messageBox(text, parent=None, **kwargs):
    import ctk
    import qt
    import slicer

    if slicer.app.testingEnabled():
        slicer.util.delayDisplay(text, autoCloseMsec=3000, parent=parent, **kwargs)
        return qt.QMessageBox.Ok
    if "detailedText" in kwargs:
        windowTitle = kwargs["windowTitle"] if "windowTitle" in kwargs else slicer.app.applicationName
        padding = " " * ((150 - len(windowTitle)) // 2)
        kwargs["windowTitle"] = padding + windowTitle + padding
    mbox = ctk.ctkMessageBox(parent if parent else mainWindow())
    mbox.text = text
    for key, value in kwargs.items():
        if hasattr(mbox, key):
            setattr(mbox, key, value)
    mbox.deleteLater()
    return mbox.exec_()


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    import qt

    standardButtons = standardButtons if standardButtons else qt.QMessageBox.Ok
    _messageDisplay(logging.INFO, text, None, parent=parent, windowTitle=windowTitle, mainWindowNeeded=True,
                    icon=qt.QMessageBox.Information, standardButtons=standardButtons, **kwargs)


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    import qt

    standardButtons = standardButtons if standardButtons else qt.QMessageBox.Ok
    _messageDisplay(logging.WARNING, text, None, parent=parent, windowTitle=windowTitle, mainWindowNeeded=True,
                    icon=qt.QMessageBox.Warning, standardButtons=standardButtons, **kwargs)


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    import qt

    standardButtons = standardButtons if standardButtons else qt.QMessageBox.Ok
    _messageDisplay(logging.ERROR, text, None, parent=parent, windowTitle=windowTitle, mainWindowNeeded=True,
                    icon=qt.QMessageBox.Critical, standardButtons=standardButtons, **kwargs)


def _confirm(text, windowTitle, parent, buttons, accept, **kwargs) -> bool:
    """A question box with `buttons`; True when the answer is `accept` (util.py's confirm*Display)."""
    import qt
    import slicer

    if not windowTitle:
        windowTitle = slicer.app.applicationName + " confirmation"
    result = _messageDisplay(logging.INFO, text, True, parent=parent, windowTitle=windowTitle, icon=qt.QMessageBox.Question, standardButtons=buttons, **kwargs)
    return result == accept


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    import qt

    return _confirm(text, windowTitle, parent, qt.QMessageBox.Ok | qt.QMessageBox.Cancel, qt.QMessageBox.Ok, **kwargs)


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    import qt

    return _confirm(text, windowTitle, parent, qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.Yes, **kwargs)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    import slicer

    try:
        if waitCursor:
            slicer.app.setOverrideCursor(qt_class("Qt").WaitCursor)
        yield
        if waitCursor:
            slicer.app.restoreOverrideCursor()
    except Exception as e:
        if waitCursor:
            slicer.app.restoreOverrideCursor()
        if show and not slicer.app.testingEnabled():
            errorMessage = f"{message}\n\n{e}" if message is not None else str(e)
            import traceback

            errorDisplay(errorMessage, detailedText=traceback.format_exc())
        raise


def toBool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def settingsValue(key, default, converter=lambda v: v, settings=None):
    import slicer

    settings = settings or slicer.app.settings()
    return converter(settings.value(key)) if settings.contains(key) else default


def modulePath(moduleName: str) -> str:
    return sys.modules[moduleName].__file__


def _reader(function):
    def read(*args, **kwargs):
        import slicer

        with slicer.mrmlScene.reading():
            return function(*args, **kwargs)

    read.__name__ = function.__name__
    read.__doc__ = function.__doc__
    return read


READERS = tuple(_reader(f) for f in (slicer_standin.loadVolume, slicer_standin.loadLabelVolume, slicer_standin.loadSegmentation))

GUI_FUNCTIONS = (loadUI, findChildren, childWidgetVariables, mainWindow, delayDisplay, _messageDisplay, messageBox, infoDisplay,
                 warningDisplay, errorDisplay, confirmOkCancelDisplay, confirmYesNoDisplay, tryWithErrorDisplay, toBool,
                 settingsValue, modulePath) + READERS


# --- slicer.ScriptedLoadableModule, the panel's part -----------------------------------------------

class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        import qt
        import slicer

        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        self.developerMode = slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)
        if not parent:
            self.parent = slicer.qMRMLWidget()
            self.parent.setLayout(qt.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()
        slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def resourcePath(self, filename: str) -> str:
        import os

        import slicer

        return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

    def cleanup(self) -> None:
        pass

    def _onModuleAboutToBeUnloaded(self, moduleName: str) -> None:
        import slicer

        if moduleName == self.moduleName:
            self.cleanup()
            slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def setupDeveloperSection(self) -> None:
        if not self.developerMode:
            return
        raise NotImplementedError("the developer section (Reload & Test) is not part of the stand-in")

    def setup(self) -> None:
        self.setupDeveloperSection()

    def onReload(self) -> None:
        raise NotImplementedError("Reload is not part of the stand-in")


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        if self.isSingletonParameterNode:
            parameterNode = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if parameterNode:
                return parameterNode
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        import slicer

        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        node.SetAttribute("ModuleName", self.moduleName)
        return node


# --- slicer.app's GUI part -----------------------------------------------------------------------

class SelectionNode:
    def __init__(self) -> None:
        self.activeTableID: Optional[str] = None
        self.propagated: List[Optional[str]] = []

    def SetActiveTableID(self, tableID: str) -> None:
        self.activeTableID = tableID


class ApplicationLogic:
    """vtkSlicerApplicationLogic: the selection node and PropagateTableSelection (the table views show it)."""

    def __init__(self) -> None:
        self.selection = SelectionNode()

    def GetSelectionNode(self) -> SelectionNode:
        return self.selection

    def PropagateTableSelection(self) -> None:
        self.selection.propagated.append(self.selection.activeTableID)


def module_manager_class():
    class qSlicerModuleManager(qt_class("QObject")):
        moduleAboutToBeUnloaded = widgets.pyqtSignal(str)

    return qSlicerModuleManager
