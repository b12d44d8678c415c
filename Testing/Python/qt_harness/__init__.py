"""The Med3DFM panel (the real Med3DFMWidget) in a real Qt, without Slicer.

    harness = PanelHarness()
    harness.install()          # real-Qt `qt`/`ctk`, the GUI half of `slicer` over slicer_standin
    widget = harness.build_panel()   # Med3DFMWidget(parent).setup(), then enter(), in a shown main window
    harness.click(widget.ui.applyButton)
    harness.wait_until(lambda: widget.ui.applyButton.enabled)
    harness.uninstall()        # cleanup(), windows closed, every module put back as it was

How it fits together:
- `qt` (pythonqt.py): PyQt5 in PythonQt's dialect: properties as attributes, `connect('clicked(bool)', slot)`,
  slots called with as many arguments as they take, exceptions in slots printed and recorded instead of
  aborting (PythonQt's behaviour), PythonQt's return types where they differ.
- the .ui is read by PyQt5's uic with those classes, the custom widgets (qMRMLWidget, qMRMLNodeComboBox,
  ctkCollapsibleButton) as stand-ins (widgets.py), and its <connections> made by C++ signature.
- `slicer` is slicer_standin's (scene, nodes, readers) plus slicer_gui.py: an observable scene, the
  parameter node wrapper with GUI connectors, slicer.util's displays and loadUI, the scripted-module base
  classes, slicer.app's GUI calls. slicer.app.testingEnabled() is False, so message boxes are "shown" as
  in a user's Slicer: recorded in DIALOGS.messages and answered from DIALOGS.answers.

Nothing here is imported by the module: the harness lives under Testing/ and is installed by the tests only;
uninstall() puts back the `slicer`, `qt`, Med3DFM and Med3DFMSlicer modules that were there before, so the
stand-in tests that run later in the same process see what they always saw.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, Optional

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no X server needed; set QT_QPA_PLATFORM=xcb to watch
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="qt-runtime-"))

from PyQt5 import QtCore, QtTest, QtWidgets  # noqa: E402

import slicer_standin  # noqa: E402

from . import pythonqt, slicer_gui, widgets  # noqa: E402
from .widgets import DIALOGS  # noqa: E402

MODULE_NAME = "Med3DFM"
_SAVED_MODULES = ("qt", "ctk", "slicer", "slicer.util", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", MODULE_NAME)
_SLICER_ATTRIBUTES = ("app", "mrmlScene", "util", "ScriptedLoadableModule", "parameterNodeWrapper", "qMRMLWidget", "qMRMLNodeComboBox",
                      "qSlicerScriptedLoadableModuleWidget", "vtkMRMLNode")
_MISSING = object()


def application() -> QtWidgets.QApplication:
    app = QtWidgets.QApplication.instance()
    if app is None:
        app = QtWidgets.QApplication(["Med3DFM panel harness"])
        app.setStyle("Fusion")  # Slicer's own style is a proxy of Fusion
    return app


class PanelHarness:
    def __init__(self) -> None:
        self.installed = False
        self.widget = None
        self.panel = None
        self.main_window = None
        self._saved_modules: Dict[str, Any] = {}
        self._saved_attributes: Dict[str, Any] = {}
        self.module: Optional[types.ModuleType] = None

    # --- install / uninstall ---------------------------------------------------------------------

    def install(self) -> types.ModuleType:
        """Install the GUI half of Slicer over the stand-in and import Med3DFM afresh; returns the module."""
        app = application()
        slicer = slicer_standin.install()
        self._saved_modules = {name: sys.modules.get(name, _MISSING) for name in _SAVED_MODULES}
        self._saved_modules.update({name: module for name, module in sys.modules.items() if name.split(".")[0] == "Med3DFMSlicer"})
        self._saved_attributes = {name: getattr(slicer, name, _MISSING) for name in _SLICER_ATTRIBUTES}

        qt = pythonqt.make_module()
        ctk = types.ModuleType("ctk")
        ctk.ctkCollapsibleButton = widgets.ctkCollapsibleButton
        ctk.ctkMessageBox = widgets.ctkMessageBox

        util = types.ModuleType("slicer.util")
        util.__dict__.update({k: v for k, v in vars(slicer.util).items() if not k.startswith("__")})
        for function in slicer_gui.GUI_FUNCTIONS:
            setattr(util, function.__name__, function)
        util.VTKObservationMixin = slicer_gui.VTKObservationMixin
        util.NodeModify = slicer_gui.NodeModify

        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        for name in ("Default", "Choice", "WithinRange", "parameterNodeWrapper"):
            setattr(wrapper, name, getattr(slicer_gui, name))

        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        standin_scripted = slicer.ScriptedLoadableModule
        scripted.ScriptedLoadableModule = standin_scripted.ScriptedLoadableModule
        scripted.ScriptedLoadableModuleTest = standin_scripted.ScriptedLoadableModuleTest
        scripted.ScriptedLoadableModuleWidget = slicer_gui.ScriptedLoadableModuleWidget
        scripted.ScriptedLoadableModuleLogic = slicer_gui.ScriptedLoadableModuleLogic

        self.application_logic = slicer_gui.ApplicationLogic()
        self.module_manager = slicer_gui.module_manager_class()()
        self.settings = slicer_standin.Settings()
        old_app = slicer.app
        slicer.app = types.SimpleNamespace(
            **{k: v for k, v in vars(old_app).items() if k not in ("testingEnabled", "settings")},
            applicationName="Slicer",
            testingEnabled=lambda: False,  # a user's Slicer: message boxes are shown (here: recorded)
            settings=lambda: self.settings,
            applicationLogic=lambda: self.application_logic,
            moduleManager=lambda: self.module_manager,
            setOverrideCursor=QtWidgets.QApplication.setOverrideCursor,
            restoreOverrideCursor=QtWidgets.QApplication.restoreOverrideCursor,
            processEvents=app.processEvents,
            clipboard=QtWidgets.QApplication.clipboard,
        )
        slicer.mrmlScene = slicer_gui.ObservableScene()
        slicer.util = util
        slicer.parameterNodeWrapper = wrapper
        slicer.ScriptedLoadableModule = scripted
        slicer.qMRMLWidget = widgets.qMRMLWidget
        slicer.qMRMLNodeComboBox = widgets.qMRMLNodeComboBox
        slicer.qSlicerScriptedLoadableModuleWidget = widgets.qSlicerScriptedLoadableModuleWidget
        slicer.vtkMRMLNode = slicer_standin.Node

        for name in [n for n in sys.modules if n == MODULE_NAME or n.split(".")[0] == "Med3DFMSlicer"]:
            del sys.modules[name]
        sys.modules.update({"qt": qt, "ctk": ctk, "slicer.util": util, "slicer.parameterNodeWrapper": wrapper,
                            "slicer.ScriptedLoadableModule": scripted})
        DIALOGS.reset()
        pythonqt.SLOT_ERRORS.clear()
        self.installed = True
        self.module = importlib.import_module(MODULE_NAME)
        return self.module

    def uninstall(self) -> None:
        if not self.installed:
            return
        try:
            if self.widget is not None:
                self.module_manager.moduleAboutToBeUnloaded.emit(MODULE_NAME)  # Slicer calls the widget's cleanup()
                self.process_events()
            if self.main_window is not None:
                self.main_window.close()
                self.main_window.deleteLater()
                self.process_events()
        finally:
            slicer_gui._main_window = None
            self.widget = self.panel = self.main_window = None
            slicer = slicer_standin.slicer
            for name in [n for n in sys.modules if n == MODULE_NAME or n.split(".")[0] == "Med3DFMSlicer"]:
                del sys.modules[name]
            for name, module in self._saved_modules.items():
                if module is _MISSING:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
            for name, value in self._saved_attributes.items():
                if value is _MISSING:
                    if hasattr(slicer, name):
                        delattr(slicer, name)
                else:
                    setattr(slicer, name, value)
            self.installed = False

    # --- the panel -------------------------------------------------------------------------------

    def build_panel(self, width: int = 470):
        """What Slicer does when the module is first shown: the widget class with the module panel as
        parent, setup(), then enter(); the panel lives in a shown main window (slicer.util.mainWindow())."""
        import qt

        self.main_window = qt.QMainWindow()
        self.main_window.setWindowTitle("3D Slicer (panel harness)")
        slicer_gui._main_window = self.main_window
        self.panel = widgets.qSlicerScriptedLoadableModuleWidget()
        self.panel.setObjectName("Med3DFMModulePanel")
        self.main_window.setCentralWidget(self.panel)
        self.widget = self.module.Med3DFMWidget(self.panel)
        self.widget.setup()
        self.panel.isEntered = True
        self.widget.enter()
        self.main_window.resize(width, 900)
        self.main_window.show()
        self.process_events()
        return self.widget

    @property
    def ui(self):
        return self.widget.ui

    # --- acting as the user ------------------------------------------------------------------------

    @staticmethod
    def process_events(milliseconds: int = 0) -> None:
        application().processEvents()
        if milliseconds:
            QtTest.QTest.qWait(milliseconds)

    def reachable(self, widget) -> bool:
        """Visible to the user: shown, and not inside a collapsed section."""
        if not QtWidgets.QWidget.isVisible(widget):
            return False
        parent = QtWidgets.QWidget.parentWidget(widget)
        while parent is not None:
            if isinstance(parent, widgets.ctkCollapsibleButton) and parent.collapsed:
                return False
            parent = QtWidgets.QWidget.parentWidget(parent)
        return True

    def click(self, button) -> None:
        """A mouse click, as the user can make it: the button must be reachable and enabled."""
        name = QtCore.QObject.objectName(button)
        assert self.reachable(button), f"{name} is not visible (hidden, or in a collapsed section)"
        assert QtWidgets.QWidget.isEnabled(button), f"{name} is disabled: the user cannot click it"
        point = QtWidgets.QWidget.rect(button).center()
        if isinstance(button, QtWidgets.QCheckBox):  # on the box itself (a check box without text is mostly empty space)
            option = QtWidgets.QStyleOptionButton()
            button.initStyleOption(option)
            point = QtWidgets.QWidget.style(button).subElementRect(QtWidgets.QStyle.SE_CheckBoxClickRect, option, button).center()
        QtTest.QTest.mouseClick(button, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, point)
        self.process_events()

    def expand(self, section) -> None:
        """Open a collapsed section by clicking its header."""
        if section.collapsed:
            QtTest.QTest.mouseClick(section, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, QtCore.QPoint(40, 6))
            self.process_events()
        assert not section.collapsed

    def choose(self, combo, text: str) -> None:
        """Pick the item with this text (starting with it) in a combo box, as from its popup."""
        texts = [QtWidgets.QComboBox.itemText(combo, i) for i in range(QtWidgets.QComboBox.count(combo))]
        matches = [i for i, t in enumerate(texts) if t == text] or [i for i, t in enumerate(texts) if t.startswith(text)]
        assert matches, f"{QtCore.QObject.objectName(combo)} has no item {text!r}: {texts}"
        assert self.reachable(combo) and QtWidgets.QWidget.isEnabled(combo), f"{QtCore.QObject.objectName(combo)} cannot be used"
        QtWidgets.QComboBox.setCurrentIndex(combo, matches[0])
        combo.activated[int].emit(matches[0])  # as a choice from the popup also says
        self.process_events()

    def type_text(self, line_edit, text: str) -> None:
        QtWidgets.QLineEdit.clear(line_edit)
        QtTest.QTest.keyClicks(line_edit, text)
        self.process_events()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 120.0, what: str = "") -> None:
        """Run the event loop (the panel's poll timer) until `condition()` holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or condition}; panel: {self.describe()}")
            self.process_events(20)

    def describe(self) -> Dict[str, str]:
        """The status lines the user reads, for failure messages."""
        ui = self.widget.ui
        return {name: getattr(ui, name).text for name in ("statusLabel", "learnStatusLabel", "classifyStatusLabel", "modelsStatusLabel", "domainLabel")}

    def screenshot(self, path: Path, width: int = 470) -> Path:
        """The panel as the user sees it (PNG), its height fitted to its contents."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.process_events()
        height = QtWidgets.QWidget.sizeHint(self.panel).height()
        self.main_window.resize(width, max(200, height))
        self.process_events()
        assert widgets.save_png(QtWidgets.QWidget.grab(self.panel).toImage(), path), f"could not write {path}"
        return path

    # --- what the user was told ------------------------------------------------------------------

    @property
    def messages(self):
        return DIALOGS.messages

    @property
    def file_dialogs(self):
        return DIALOGS.file_dialogs

    @property
    def opened_urls(self):
        return DIALOGS.opened_urls

    @property
    def slot_errors(self):
        return pythonqt.SLOT_ERRORS

    @staticmethod
    def answer(*answers) -> None:
        """The answers of the next message boxes (qt.QMessageBox.Ok, .Cancel, .Yes, .No), in order."""
        DIALOGS.answers.extend(int(a) for a in answers)

    @staticmethod
    def answer_file(*paths: str) -> None:
        DIALOGS.file_answers.extend(str(p) for p in paths)
