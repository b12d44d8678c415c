"""Stand-ins for the Slicer, CTK and MRML widgets of the .ui, the .ui loader, and dialogs that answer
themselves.

Each stand-in is a real Qt widget (it draws, takes clicks and is grabbed in screenshots) with the
properties, methods and signals of the Slicer class that Med3DFM.py and Slicer's parameterNodeWrapper
use, named as in Slicer (qMRMLNodeComboBox: nodeTypes, noneEnabled, currentNode(), setCurrentNode(),
currentNodeChanged(vtkMRMLNode*), ...). A custom widget in the .ui without a stand-in here is an error
that names it.

Dialogs never block: every message box (slicer.util's displays go through ctkMessageBox; direct
QMessageBox calls too) is recorded in DIALOGS.messages and answered from DIALOGS.answers (a queue;
empty: the box's escape answer, Cancel or No, so nothing is confirmed by accident). QFileDialog takes
its answers from DIALOGS.file_answers; QDesktopServices.openUrl records the URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from PyQt5 import QtCore, QtGui, QtWidgets
from PyQt5.uic.exceptions import NoSuchWidgetError
from PyQt5.uic.Loader.loader import DynamicUILoader
from PyQt5.uic.Loader.qobjectcreator import LoaderCreatorPolicy
from PyQt5.uic.uiparser import UIParser

from . import pythonqt
from .pythonqt import lookup as _qt
from .pythonqt import register

pyqtSignal = QtCore.pyqtSignal
pyqtProperty = QtCore.pyqtProperty
MAX_SIZE = 16777215  # QWIDGETSIZE_MAX


# --- dialogs ----------------------------------------------------------------------------------------

@dataclass
class Message:
    kind: str  # "information", "warning", "critical", "question"
    title: str
    text: str
    detailedText: str
    answer: int
    image: Optional[QtGui.QImage] = None  # the box as it would have looked

    def save(self, path) -> None:
        """A screenshot of the box (PNG)."""
        assert self.image is not None and save_png(self.image, path), f"could not write {path}"

    def __str__(self) -> str:
        return f"[{self.kind}] {self.title}: {self.text}"


@dataclass
class Dialogs:
    messages: List[Message] = field(default_factory=list)
    answers: List[int] = field(default_factory=list)  # next answers of message boxes (QMessageBox.Ok, ...)
    file_answers: List[str] = field(default_factory=list)  # next answers of file dialogs ("" = cancelled)
    file_dialogs: List[str] = field(default_factory=list)  # the captions of the file dialogs opened
    opened_urls: List[str] = field(default_factory=list)

    def reset(self) -> None:
        for items in (self.messages, self.answers, self.file_answers, self.file_dialogs, self.opened_urls):
            items.clear()


DIALOGS = Dialogs()
_KINDS = {QtWidgets.QMessageBox.Information: "information", QtWidgets.QMessageBox.Warning: "warning",
          QtWidgets.QMessageBox.Critical: "critical", QtWidgets.QMessageBox.Question: "question"}
_ESCAPE_ORDER = (QtWidgets.QMessageBox.Cancel, QtWidgets.QMessageBox.No, QtWidgets.QMessageBox.Close,
                 QtWidgets.QMessageBox.Abort, QtWidgets.QMessageBox.Ok)


def _answer(buttons: int) -> int:
    if DIALOGS.answers:
        return int(DIALOGS.answers.pop(0))
    return int(next((b for b in _ESCAPE_ORDER if int(buttons) & int(b)), QtWidgets.QMessageBox.Ok))


def _record(kind: str, title: str, text: str, detailed: str, buttons: int, image: Optional[QtGui.QImage] = None) -> int:
    answer = _answer(buttons)
    DIALOGS.messages.append(Message(kind, title, text, detailed, answer, image))
    return answer


def save_png(image: QtGui.QImage, path) -> bool:
    """A small PNG: a widget's few colours fit an 8-bit palette."""
    return image.convertToFormat(QtGui.QImage.Format_Indexed8, QtCore.Qt.ThresholdDither | QtCore.Qt.AvoidDither).save(os.fspath(path), "PNG")


def _picture(box: QtWidgets.QMessageBox) -> QtGui.QImage:
    """What the box shows: shown (not run modally, so nothing blocks), grabbed, hidden again."""
    QtWidgets.QWidget.show(box)  # QMessageBox sizes itself to its text when shown
    QtWidgets.QApplication.processEvents()
    image = QtWidgets.QWidget.grab(box).toImage()
    QtWidgets.QWidget.hide(box)
    return image


class QMessageBox(pythonqt.wrap_class(QtWidgets.QMessageBox)):
    """A message box that is recorded and answered instead of shown; the static functions likewise."""

    def exec_(self) -> int:
        return _record(_KINDS.get(QtWidgets.QMessageBox.icon(self), "information"), QtWidgets.QMessageBox.windowTitle(self),
                       QtWidgets.QMessageBox.text(self), QtWidgets.QMessageBox.detailedText(self),
                       QtWidgets.QMessageBox.standardButtons(self), _picture(self))

    exec = exec_

    @staticmethod
    def _static(kind, parent, title, text, buttons=None, defaultButton=None):
        if buttons is None:
            buttons = (QtWidgets.QMessageBox.Yes | QtWidgets.QMessageBox.No) if kind == "question" else QtWidgets.QMessageBox.Ok
        return _record(kind, title, text, "", buttons)

    @staticmethod
    def information(parent, title, text, *args):
        return QMessageBox._static("information", parent, title, text, *args)

    @staticmethod
    def warning(parent, title, text, *args):
        return QMessageBox._static("warning", parent, title, text, *args)

    @staticmethod
    def critical(parent, title, text, *args):
        return QMessageBox._static("critical", parent, title, text, *args)

    @staticmethod
    def question(parent, title, text, *args):
        return QMessageBox._static("question", parent, title, text, *args)


register(QMessageBox)


class ctkMessageBox(QMessageBox):
    """CTK's message box (slicer.util.messageBox): a QMessageBox with a "Don't show again" option."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._dontShowAgainKey = ""
        self._dontShowAgainVisible = False

    def _key(self) -> str:
        return self._dontShowAgainKey

    def setDontShowAgainSettingsKey(self, key: str) -> None:
        self._dontShowAgainKey = key

    def _visible(self) -> bool:
        return self._dontShowAgainVisible

    def setDontShowAgainVisible(self, visible: bool) -> None:
        self._dontShowAgainVisible = bool(visible)

    dontShowAgainSettingsKey = pyqtProperty(str, _key, setDontShowAgainSettingsKey)
    dontShowAgainVisible = pyqtProperty(bool, _visible, setDontShowAgainVisible)


class QFileDialog(pythonqt.wrap_class(QtWidgets.QFileDialog)):
    """PythonQt's static file dialogs return the path (PyQt5's return (path, filter)); answered from DIALOGS."""

    @staticmethod
    def _next(kind, args) -> str:
        DIALOGS.file_dialogs.append(str(args[1]) if len(args) > 1 else kind)
        return DIALOGS.file_answers.pop(0) if DIALOGS.file_answers else ""

    @staticmethod
    def getOpenFileName(*args, **kwargs) -> str:
        return QFileDialog._next("getOpenFileName", args)

    @staticmethod
    def getSaveFileName(*args, **kwargs) -> str:
        return QFileDialog._next("getSaveFileName", args)

    @staticmethod
    def getExistingDirectory(*args, **kwargs) -> str:
        return QFileDialog._next("getExistingDirectory", args)


register(QFileDialog)


class QDesktopServices:
    @staticmethod
    def openUrl(url) -> bool:
        DIALOGS.opened_urls.append(url.toString() if hasattr(url, "toString") else str(url))
        return True


register(QDesktopServices)


class QTimer(pythonqt.wrap_class(QtCore.QTimer)):
    @staticmethod
    def singleShot(msec: int, *target) -> None:
        """PythonQt: singleShot(msec, callable) or singleShot(msec, receiver, 'slot()')."""
        function = target[0] if len(target) == 1 else getattr(target[0], pythonqt.parse_signature(target[1])[0])
        QtCore.QTimer.singleShot(msec, pythonqt.guarded(function, f"QTimer.singleShot -> {getattr(function, '__qualname__', function)}"))


register(QTimer)


# --- MRML and CTK widgets ---------------------------------------------------------------------------

class qMRMLWidget(_qt("QWidget")):
    """Slicer's base of MRML-aware widgets: setMRMLScene() emits mrmlSceneChanged(vtkMRMLScene*), which the
    .ui connects to the setMRMLScene slot of each node selector."""

    mrmlSceneChanged = pyqtSignal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The module panel Slicer hands a scripted module's widget as its parent (isEntered: the module is shown)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._entered = False
        QtWidgets.QWidget.setLayout(self, _qt("QVBoxLayout")())

    def _isEntered(self) -> bool:
        return self._entered

    def setIsEntered(self, entered: bool) -> None:
        self._entered = bool(entered)

    isEntered = pyqtProperty(bool, _isEntered, setIsEntered)


class ctkCollapsibleButton(_qt("QWidget")):
    """A titled section that folds away: click the header to collapse or expand. Collapsed, the section is
    only its header (the children keep their own visibility, clipped, as they would be restored in CTK)."""

    contentsCollapsed = pyqtSignal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""
        self._collapsed = False
        self._header = QtWidgets.QWidget.fontMetrics(self).height() + 12
        QtWidgets.QWidget.setContentsMargins(self, 0, self._header + 2, 0, 0)

    def _getText(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = str(text)
        QtWidgets.QWidget.update(self)

    def _getCollapsed(self) -> bool:
        return self._collapsed

    def setCollapsed(self, collapsed: bool) -> None:
        collapsed = bool(collapsed)
        if collapsed == self._collapsed:
            return
        self._collapsed = collapsed
        QtWidgets.QWidget.setMaximumHeight(self, self._header if collapsed else MAX_SIZE)
        QtWidgets.QWidget.updateGeometry(self)
        QtWidgets.QWidget.update(self)
        self.contentsCollapsed.emit(collapsed)

    text = pyqtProperty(str, _getText, setText)
    collapsed = pyqtProperty(bool, _getCollapsed, setCollapsed)

    def headerRect(self) -> QtCore.QRect:
        return QtCore.QRect(0, 0, QtWidgets.QWidget.width(self), self._header)

    def sizeHint(self) -> QtCore.QSize:
        hint = super().sizeHint()
        return QtCore.QSize(hint.width(), self._header) if self._collapsed else hint

    def minimumSizeHint(self) -> QtCore.QSize:
        hint = super().minimumSizeHint()
        return QtCore.QSize(hint.width(), self._header) if self._collapsed else hint

    def mousePressEvent(self, event) -> None:
        if self.headerRect().contains(event.pos()):
            self.setCollapsed(not self._collapsed)
        else:
            super().mousePressEvent(event)

    def paintEvent(self, event) -> None:
        painter = QtWidgets.QStylePainter(self)
        option = QtWidgets.QStyleOptionButton()
        option.initFrom(self)
        option.rect = self.headerRect()
        option.state |= QtWidgets.QStyle.State_Raised
        painter.drawControl(QtWidgets.QStyle.CE_PushButtonBevel, option)
        arrow = QtWidgets.QStyleOption()
        arrow.initFrom(self)
        arrow.rect = QtCore.QRect(6, (self._header - 10) // 2, 10, 10)
        painter.drawPrimitive(QtWidgets.QStyle.PE_IndicatorArrowRight if self._collapsed else QtWidgets.QStyle.PE_IndicatorArrowDown, arrow)
        painter.drawText(option.rect.adjusted(22, 0, -6, 0), QtCore.Qt.AlignVCenter | QtCore.Qt.AlignLeft, self._text)
        if not self._collapsed:  # the contents' frame, as CTK draws it under the header
            painter.setPen(QtWidgets.QWidget.palette(self).mid().color())
            painter.drawRect(QtCore.QRect(0, self._header, QtWidgets.QWidget.width(self) - 1, QtWidgets.QWidget.height(self) - self._header - 1))


class qMRMLNodeComboBox(_qt("QComboBox")):
    """Slicer's node selector: the scene's nodes of `nodeTypes`, a "None" item when noneEnabled (shown as
    noneDisplay), the current node as currentNode()/setCurrentNode(); follows nodes added to and removed
    from the scene; with noneEnabled false a node is always selected when there is one."""

    currentNodeChanged = pyqtSignal(object)  # PythonQt: currentNodeChanged(vtkMRMLNode*)
    currentNodeIDChanged = pyqtSignal(str)  # currentNodeIDChanged(QString)
    nodeAdded = pyqtSignal(object)
    nodeAboutToBeRemoved = pyqtSignal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observers: List[int] = []
        self._nodeTypes: List[str] = []
        self._noneEnabled = False
        self._noneDisplay = "None"
        self._flags: Dict[str, bool] = {"addEnabled": True, "removeEnabled": True, "renameEnabled": False, "editEnabled": False,
                                        "showChildNodeTypes": True, "showHidden": False}
        self._currentID = ""
        self._refreshing = False
        QtWidgets.QComboBox.setSizeAdjustPolicy(self, QtWidgets.QComboBox.AdjustToMinimumContentsLengthWithIcon)
        QtWidgets.QComboBox.setMinimumContentsLength(self, 12)
        self.currentIndexChanged[int].connect(self._onIndexChanged)

    # properties (the names Slicer's .ui files and Python use)
    def _getNodeTypes(self) -> List[str]:
        return list(self._nodeTypes)

    def setNodeTypes(self, nodeTypes) -> None:
        self._nodeTypes = [str(t) for t in nodeTypes]
        self._refresh()

    def _getNoneEnabled(self) -> bool:
        return self._noneEnabled

    def setNoneEnabled(self, enabled: bool) -> None:
        self._noneEnabled = bool(enabled)
        self._refresh()

    def _getNoneDisplay(self) -> str:
        return self._noneDisplay

    def setNoneDisplay(self, text: str) -> None:
        self._noneDisplay = str(text)
        self._refresh()

    def _getCurrentNodeID(self) -> str:
        return self._currentID

    nodeTypes = pyqtProperty("QStringList", _getNodeTypes, setNodeTypes)
    noneEnabled = pyqtProperty(bool, _getNoneEnabled, setNoneEnabled)
    noneDisplay = pyqtProperty(str, _getNoneDisplay, setNoneDisplay)
    currentNodeID = pyqtProperty(str, _getCurrentNodeID)

    def _flag(name):  # noqa: N805 - a property factory used in the class body
        def get(self) -> bool:
            return self._flags[name]

        def set_(self, value: bool) -> None:
            self._flags[name] = bool(value)
            if name == "showChildNodeTypes":
                self._refresh()

        return get, set_

    addEnabled = pyqtProperty(bool, *_flag("addEnabled"))
    removeEnabled = pyqtProperty(bool, *_flag("removeEnabled"))
    renameEnabled = pyqtProperty(bool, *_flag("renameEnabled"))
    editEnabled = pyqtProperty(bool, *_flag("editEnabled"))
    showChildNodeTypes = pyqtProperty(bool, *_flag("showChildNodeTypes"))
    showHidden = pyqtProperty(bool, *_flag("showHidden"))
    setAddEnabled = addEnabled.fset
    setRemoveEnabled = removeEnabled.fset
    setRenameEnabled = renameEnabled.fset
    setEditEnabled = editEnabled.fset
    setShowChildNodeTypes = showChildNodeTypes.fset
    setShowHidden = showHidden.fset
    del _flag

    # the scene
    def setMRMLScene(self, scene) -> None:
        if self._scene is not None:
            for tag in self._observers:
                self._scene.RemoveObserver(tag)
        self._observers = []
        self._scene = scene
        if scene is not None:
            self._observers = [scene.AddObserver(scene.NodeAddedEvent, self._onSceneChanged),
                               scene.AddObserver(scene.NodeRemovedEvent, self._onSceneChanged),
                               scene.AddObserver(scene.EndCloseEvent, self._onSceneChanged)]
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node) -> bool:
        if self._flags["showChildNodeTypes"]:
            names = {cls.__name__ for cls in type(node).__mro__}
        else:
            names = {type(node).__name__}
        return bool(names & set(self._nodeTypes))

    def nodes(self) -> List[Any]:
        if self._scene is None or not self._nodeTypes:
            return []
        return [node for node in self._scene.nodes if self._accepts(node)]

    def _onSceneChanged(self, caller, event) -> None:
        self._refresh()

    def _refresh(self) -> None:
        """Rebuild the items from the scene; keep the current node if it is still there."""
        self._refreshing = True
        try:
            QtWidgets.QComboBox.clear(self)
            if self._noneEnabled:
                QtWidgets.QComboBox.addItem(self, self._noneDisplay, "")
            for node in self.nodes():
                QtWidgets.QComboBox.addItem(self, node.GetName(), node.GetID())
            index = QtWidgets.QComboBox.findData(self, self._currentID) if self._currentID else -1
            if index < 0:
                index = 0 if QtWidgets.QComboBox.count(self) else -1  # "None", or else the first node
            QtWidgets.QComboBox.setCurrentIndex(self, index)
        finally:
            self._refreshing = False
        self._onIndexChanged(QtWidgets.QComboBox.currentIndex(self))

    def _onIndexChanged(self, index: int) -> None:
        if self._refreshing:
            return
        nodeID = QtWidgets.QComboBox.itemData(self, index) if index >= 0 else ""
        nodeID = nodeID or ""
        if nodeID != self._currentID:
            self._currentID = nodeID
            self.currentNodeIDChanged.emit(nodeID)
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        if not self._currentID or self._scene is None:
            return None
        return self._scene.GetNodeByID(self._currentID)

    def setCurrentNode(self, node) -> None:
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeID: str) -> None:
        index = QtWidgets.QComboBox.findData(self, nodeID) if nodeID else (0 if self._noneEnabled else -1)
        if nodeID and index < 0:
            return  # not a node this selector lists: Slicer leaves the selection as it was
        QtWidgets.QComboBox.setCurrentIndex(self, index)

    def nodeCount(self) -> int:
        return len(self.nodes())

    def nodeFromIndex(self, index: int):
        nodes = self.nodes()
        return nodes[index] if 0 <= index < len(nodes) else None

    def showPopup(self) -> None:
        self._refresh()  # names may have changed (the stand-in nodes send no ModifiedEvent)
        super().showPopup()


# the classes the .ui names, as the loader builds them (also slicer.qMRMLNodeComboBox, ctk.ctkCollapsibleButton)
CUSTOM_WIDGETS: Dict[str, type] = {cls.__name__: cls for cls in (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton)}


# --- the .ui loader -------------------------------------------------------------------------------

class _QtClasses:
    """Standard Qt classes for the form: the PythonQt-flavoured ones of the `qt` module."""

    @classmethod
    def search(cls, name: str):
        try:
            value = pythonqt.lookup(name)
        except AttributeError:
            return None
        return value if isinstance(value, type) else None


class _CustomClasses:
    def __init__(self) -> None:
        self._declared: Dict[str, str] = {}

    def addCustomWidget(self, widgetClass: str, baseClass: str, module: str) -> None:
        self._declared[widgetClass] = module

    def search(self, name: str):
        if name not in self._declared:
            return None
        if name not in CUSTOM_WIDGETS:
            raise NoSuchWidgetError(f"{name} (declared by the .ui with header {self._declared[name]}.h) has no stand-in: "
                                    f"add one to Testing/Python/qt_harness/widgets.py")
        return CUSTOM_WIDGETS[name]


class _Policy(LoaderCreatorPolicy):
    def createQtGuiWidgetsWrappers(self):
        return [_QtClasses]

    def createCustomWidgetLoader(self):
        return _CustomClasses()


class _FormLoader(DynamicUILoader):
    def __init__(self) -> None:
        UIParser.__init__(self, QtCore, QtGui, QtWidgets, _Policy(""))

    def createConnections(self, elem) -> None:
        """<connections> made as Slicer's QUiLoader makes them: by C++ signature, sender to receiver slot."""
        def named(name):
            return self.toplevelWidget if name == self.uiname else QtCore.QObject.findChild(self.toplevelWidget, QtCore.QObject, name)

        for connection in elem:
            sender, receiver = named(connection.findtext("sender")), named(connection.findtext("receiver"))
            if sender is None or receiver is None:
                raise ValueError(f"connection between unknown widgets: {connection.findtext('sender')} -> {connection.findtext('receiver')}")
            signal, _count = pythonqt.bound_signal(sender, connection.findtext("signal"))
            slot_name = pythonqt.parse_signature(connection.findtext("slot"))[0]
            signal.connect(getattr(receiver, slot_name))
        QtCore.QMetaObject.connectSlotsByName(self.toplevelWidget)


def load_form(path: str):
    """The widget tree of a .ui file, built from the PythonQt-flavoured classes and the stand-ins above."""
    with pythonqt.loading():
        widget = _FormLoader().loadUi(os.fspath(path), None, "_rc")
    return widget


class QUiLoader(_qt("QObject")):
    """qt.QUiLoader as slicer.util.loadUI uses it: load(QFile) -> the form's top-level widget."""

    def load(self, device, parent=None):
        path = device.fileName() if isinstance(device, QtCore.QFile) else os.fspath(device)
        widget = load_form(path)
        if parent is not None:
            QtWidgets.QWidget.setParent(widget, parent)
        return widget


register(QUiLoader)
