"""A `qt` module that speaks PythonQt's dialect, over PyQt5.

Slicer's Python sees Qt through PythonQt, which differs from PyQt5 in the ways Med3DFM.py relies on:

- Qt properties are Python attributes: `label.text = "x"`, `button.enabled`, `combo.currentIndex = 2`,
  `bar.value / 100` (a property shadows the getter method of the same name; setters stay methods).
- Signals are connected by their C++ signature: `button.connect("clicked(bool)", slot)`, and a slot is
  called with only as many of the signal's arguments as its Python signature takes.
- An exception in a slot is printed and the application goes on (PyQt5 would abort the process).
- `qt.QFileDialog.getOpenFileName(...)` returns the path, not PyQt5's (path, filter) pair.
- An object is true while its C++ object exists (PyQt5 makes an empty QComboBox false through len()).

Every QObject class of QtCore, QtGui and QtWidgets is offered here as a subclass with that behaviour
(`qt.QPushButton`, `qt.QTimer`, ...); other names (`qt.Qt`, `qt.QUrl`, `qt.QTableWidgetItem`) are PyQt5's
own. Objects created while a .ui file is being loaded behave as plain PyQt5 objects until the load ends
(PyQt5's uic calls getters such as `sizePolicy()` that are properties here).
"""

from __future__ import annotations

import inspect
import sys
import traceback
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

from PyQt5 import QtCore, QtGui, QtWidgets, sip

# Exceptions raised in slots (PythonQt prints them and goes on): (where, exception, traceback text).
SLOT_ERRORS: List[Tuple[str, BaseException, str]] = []

_loading = 0  # > 0 while uic builds a form: the PythonQt attribute mapping is off
_property_names: Dict[type, frozenset] = {}


def _report(where: str, error: BaseException) -> None:
    text = traceback.format_exc()
    SLOT_ERRORS.append((where, error, text))
    sys.stderr.write(f"[PythonQt stand-in] exception in {where}:\n{text}")


class loading:
    """Context manager: PyQt5 semantics for every object while a form is being built."""

    def __enter__(self):
        global _loading
        _loading += 1

    def __exit__(self, *exc):
        global _loading
        _loading -= 1


def _properties(obj) -> frozenset:
    cls = type(obj)
    names = _property_names.get(cls)
    if names is None:
        meta = QtCore.QObject.metaObject(obj)
        names = frozenset(meta.property(i).name() for i in range(meta.propertyCount()))
        _property_names[cls] = names
    return names


# --- signals by C++ signature ---------------------------------------------------------------------

_CPP_TYPES = {"bool": bool, "int": int, "uint": int, "qint64": int, "double": float, "float": float, "QString": str,
              "QStringList": list, "QVariant": "QVariant", "QModelIndex": QtCore.QModelIndex, "QPoint": QtCore.QPoint,
              "QColor": QtGui.QColor, "QUrl": QtCore.QUrl}


def parse_signature(signature: str) -> Tuple[str, List[str]]:
    """'currentNodeChanged(vtkMRMLNode*)' -> ('currentNodeChanged', ['vtkMRMLNode*'])."""
    signature = signature.strip().lstrip("12")  # SIGNAL()/SLOT() prefixes, as qt.SIGNAL gives them
    if "(" not in signature or not signature.endswith(")"):
        raise ValueError(f"not a Qt signature: {signature!r} (PythonQt takes e.g. 'clicked(bool)')")
    name, arguments = signature[:-1].split("(", 1)
    arguments = [a.replace("const ", "").replace("&", "").strip() for a in arguments.split(",") if a.strip()]
    return name.strip(), arguments


def _python_types(cpp: str) -> List[Any]:
    if cpp.endswith("*"):  # vtkMRMLNode*, vtkMRMLScene*, QObject*: declared as `object` by the stand-ins
        return [object, QtCore.QObject]
    if cpp not in _CPP_TYPES:
        raise ValueError(f"signal argument type {cpp!r} is not known to the PythonQt stand-in")
    return [_CPP_TYPES[cpp]]


def bound_signal(obj, signature: str):
    """The PyQt5 bound signal (the right overload) for a PythonQt signal signature."""
    name, arguments = parse_signature(signature)
    try:
        signal = QtCore.QObject.__getattribute__(obj, name)
    except AttributeError:
        signal = None
    if not isinstance(signal, QtCore.pyqtBoundSignal):
        raise ValueError(f"{type(obj).__name__} has no signal {signature!r}")
    if not arguments:
        return signal, 0
    candidates: List[Tuple[Any, ...]] = [()]
    for cpp in arguments:
        candidates = [c + (t,) for c in candidates for t in _python_types(cpp)]
    for types_ in candidates:
        try:
            return signal[types_[0] if len(types_) == 1 else types_], len(arguments)
        except (KeyError, TypeError):
            continue
    raise ValueError(f"{type(obj).__name__} has no signal {signature!r} (its default overload is {signal.signal[1:]!r})")


def _positional_count(function: Callable) -> Optional[int]:
    """How many positional arguments a callable takes (None: any number), as PythonQt counts them."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in parameters:
        if parameter.kind == parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def guarded(function: Callable, where: str, signal_arguments: Optional[int] = None) -> Callable:
    """`function` as PythonQt calls a slot: the first N signal arguments it takes; exceptions printed, not raised."""
    takes = _positional_count(function)

    def slot(*arguments):
        if signal_arguments is not None:
            arguments = arguments[:signal_arguments]
        if takes is not None:
            arguments = arguments[:takes]
        try:
            function(*arguments)
        except Exception as error:  # noqa: BLE001 - PythonQt prints the traceback and the application goes on
            _report(where, error)

    return slot


# --- the PythonQt object behaviour ---------------------------------------------------------------

class PythonQtObject:
    """Mixed into every QObject class of this module: properties as attributes, connect by signature."""

    def __getattribute__(self, name: str):
        if name[0] != "_" and not _loading:
            if name == "name":  # PythonQt: `name` is the objectName
                return QtCore.QObject.objectName(self)
            if name in _properties(self):
                return QtCore.QObject.property(self, name)
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value) -> None:
        if name[0] != "_" and not _loading:
            if name == "name":
                QtCore.QObject.setObjectName(self, value)
                return
            if name in _properties(self):
                setter = getattr(type(self), "set" + name[0].upper() + name[1:], None)
                if setter is not None:
                    setter(self, value)
                elif not QtCore.QObject.setProperty(self, name, value):
                    raise AttributeError(f"property {name!r} of {type(self).__name__} cannot be set")
                return
        super().__setattr__(name, value)

    def __bool__(self) -> bool:
        """PythonQt: an object is true while its C++ object exists (PyQt5: an empty QComboBox is false, by len)."""
        return not sip.isdeleted(self)

    def connect(self, signal: str, target, slot: Optional[str] = None) -> bool:
        """PythonQt: obj.connect('signal(args)', callable) or obj.connect('signal(args)', receiver, 'slot(args)')."""
        if slot is not None:
            target = getattr(target, parse_signature(slot)[0])
        bound, count = bound_signal(self, signal)
        where = f"{type(self).__name__}.{signal} -> {getattr(target, '__qualname__', target)!s}"
        adapter = guarded(target, where, count)
        connections = self.__dict__.setdefault("_pythonqt_connections", [])
        connections.append((signal, target, adapter))
        bound.connect(adapter)
        return True

    def disconnect(self, signal: Optional[str] = None, target=None, slot: Optional[str] = None) -> bool:
        if signal is None:
            return QtCore.QObject.disconnect(self)
        if slot is not None:
            target = getattr(target, parse_signature(slot)[0])
        bound, _count = bound_signal(self, signal)
        connections = self.__dict__.get("_pythonqt_connections", [])
        found = False
        for entry in list(connections):
            if entry[0] == signal and (target is None or entry[1] == target):
                bound.disconnect(entry[2])
                connections.remove(entry)
                found = True
        return found


_wrapped: Dict[str, type] = {}
_SOURCES = (QtCore, QtGui, QtWidgets)


def wrap_class(base: type, name: Optional[str] = None, namespace: Optional[Dict[str, Any]] = None) -> type:
    return type(name or base.__name__, (PythonQtObject, base), {"__module__": "qt", **(namespace or {})})


def lookup(name: str):
    """qt.<name>: a PythonQt-flavoured subclass for QObject classes, PyQt5's object otherwise."""
    if name in _wrapped:
        return _wrapped[name]
    for source in _SOURCES:
        value = getattr(source, name, None)
        if value is not None:
            if isinstance(value, type) and issubclass(value, QtCore.QObject):
                value = wrap_class(value)
                _wrapped[name] = value
            return value
    raise AttributeError(f"module 'qt' has no attribute {name!r}")


def register(cls: type, name: Optional[str] = None) -> type:
    """Offer a class (a stand-in of this module's flavour) as qt.<name>."""
    _wrapped[name or cls.__name__] = cls
    return cls


def make_module() -> types.ModuleType:
    module = types.ModuleType("qt", __doc__)
    module.__getattr__ = lookup  # PEP 562: qt.QPushButton and friends on first use
    module.SIGNAL = lambda signature: "2" + signature
    module.SLOT = lambda signature: "1" + signature
    return module
