"""Where attacks are found: built-ins, installed plugins (entry points), plugin files and archives."""

from __future__ import annotations

import atexit
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ncbench.attacks.base import Attack
from ncbench.attacks.plugins.archive import SPEC_FORMS, parse_spec, prepare
from ncbench.errors import NcbenchError
from ncbench.names import name_skeleton

ENTRY_POINT_GROUP = "ncbench.attacks"
_REGISTRY: dict[str, type[Attack]] = {}
PLUGIN_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
PLUGIN_NAME_MAX = 64
# ASCII look-alikes folded by the skeleton: a plugin named `0racle` or `grarn-hungarian` is refused.


def register(cls: type[Attack]) -> type[Attack]:
    """Add an attack class under its ``name``; refuses a name that is already taken."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise TypeError(f"{cls!r} is not an Attack subclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise NcbenchError(f"an attack named {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def check_plugin_name(cls: type[Attack], registered: dict[str, type[Attack]]) -> None:
    """A plugin's name is plain lowercase ASCII and cannot pass for a ``registered`` attack's name."""
    name = cls.name
    if len(name) > PLUGIN_NAME_MAX or not PLUGIN_NAME.fullmatch(name):
        shown = ascii(name[:PLUGIN_NAME_MAX])
        raise NcbenchError(
            f"plugin attack name {shown} must be lowercase ASCII letters, digits and single hyphens "
            f"(at most {PLUGIN_NAME_MAX} characters)"
        )
    for taken, owner in registered.items():
        if owner is not cls and name_skeleton(taken) == name_skeleton(name):
            what = "the attack" if name == taken else "a look-alike of the attack"
            raise NcbenchError(
                f"plugin attack name {name!r} is {what} {taken!r} ({owner.__module__}); choose another name"
            )


def _load_entry_points() -> None:
    """Built-ins and installed plugins alike are ``ncbench.attacks`` entry points (ours are
    declared in pyproject.toml), so the registry imports no plugin. Ours load first and must
    load; a broken third-party plugin is skipped with a warning."""
    entries = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry in sorted(entries, key=lambda e: not _is_builtin(e)):
        if _is_builtin(entry):
            register(entry.load())
            continue
        try:
            cls = entry.load()
            if isinstance(cls, type) and issubclass(cls, Attack):
                check_plugin_name(cls, _REGISTRY)
            register(cls)
        except Exception as error:  # noqa: BLE001 - any failure of someone else's code
            print(f"warning: skipping plugin {entry.name!r}: {error}", file=sys.stderr)


def _is_builtin(entry: importlib.metadata.EntryPoint) -> bool:
    return entry.value.startswith("ncbench.")


def all_attacks() -> dict[str, type[Attack]]:
    """Every known attack by name (built-ins first, then installed plugins)."""
    if not _REGISTRY:
        _load_entry_points()
    return dict(_REGISTRY)


def resolve(spec: str) -> type[Attack]:
    """An attack by registered name, or a plugin: ``FILE.py:Class``, ``DIST.whl:module:Class``,
    ``DIST.tar.gz:module:Class`` or ``FOLDER:module:Class`` (:mod:`ncbench.attacks.plugins.archive`)."""
    plugin = parse_spec(spec)
    if plugin is not None:
        if plugin.kind == "file":
            return load_from_file(spec)
        if plugin.kind == "folder":
            return load_from_folder(plugin.path, plugin.module, plugin.class_name)
        return load_from_archive(plugin.path, plugin.module, plugin.class_name)
    attacks = all_attacks()
    if spec not in attacks:
        raise NcbenchError(f"unknown attack {spec!r}; known: {', '.join(sorted(attacks))} (or {SPEC_FORMS})")
    return attacks[spec]


def load_from_file(spec: str) -> type[Attack]:
    path_text, _, class_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise NcbenchError(f"plugin file {path} does not exist")
    module_name = f"ncbench_plugin_{path.stem}"
    _put_project_on_path(path)
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - any failure of a user's file (an exit too) is a user mistake
        raise NcbenchError(f"plugin file {path} failed to import: {type(error).__name__}: {error}") from None
    return _attack_class(getattr(module, class_name, None), class_name, where=str(path))


def load_from_archive(path: Path, module_name: str, class_name: str) -> type[Attack]:
    """``module:Class`` of a wheel or an sdist, after the server's checks on it (layout, pure
    Python, dependencies installed), unpacked into a temporary folder that lives as long as
    this process."""
    if not path.is_file():
        raise NcbenchError(f"plugin archive {path} does not exist")
    folder = Path(tempfile.mkdtemp(prefix="ncbench-plugin-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    prepare(path, filename=path.name, dest=folder / "unpacked", module=module_name)
    return load_from_folder(folder / "unpacked", module_name, class_name)


def load_from_folder(folder: Path, module_name: str, class_name: str) -> type[Attack]:
    """``module:Class`` imported with ``folder`` first on sys.path (an unpacked archive); the
    module must come from that folder, not from an installed package of the same name."""
    folder = folder.resolve()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - any failure of a user's package (an exit too) is a user mistake
        raise NcbenchError(f"plugin module {module_name} failed to import: {type(error).__name__}: {error}") from None
    origin = getattr(module, "__file__", None)
    if origin is None or folder not in Path(origin).resolve().parents:
        raise NcbenchError(
            f"plugin module {module_name} was imported from {origin or 'no file'}, not from the plugin: "
            "a module of that name is already installed or imported; rename the plugin's package"
        )
    return _attack_class(getattr(module, class_name, None), class_name, where=module_name)


def _attack_class(cls, class_name: str, *, where: str) -> type[Attack]:
    """``cls`` if it is a concrete Attack subclass with an allowed plugin name."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise NcbenchError(f"{where} has no Attack subclass named {class_name!r}")
    if cls is Attack or inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ()))) or "run"
        raise NcbenchError(
            f"{where}: {class_name} is abstract (it does not implement {missing}); name a concrete Attack subclass"
        )
    check_plugin_name(cls, all_attacks())
    return cls


def _put_project_on_path(path: Path) -> None:
    """Let a plugin import its own project's modules, as pytest's rootdir logic does: the first
    folder above the file that is not a package (has no ``__init__.py``) goes on ``sys.path``.
    Our packages live under ``ncbench.``, so a user's ``attacks`` package shadows nothing."""
    root = path.resolve().parent
    while (root / "__init__.py").is_file() and root.parent != root:
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
