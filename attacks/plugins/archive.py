"""Plugins larger than one file: a wheel or an sdist, checked and unpacked without running any of it
(docs/server.md#the-verified-track).

A plugin is named by a spec (:func:`parse_spec`)::

    FILE.py:Class                    one file (the attack class in it)
    DIST.whl:module.path:Class       a pure-Python wheel
    DIST.tar.gz:module.path:Class    a plain-source sdist
    FOLDER:module.path:Class         a folder put on sys.path (an unpacked archive: what the sandbox sees)

An archive is hostile until checked. :func:`unpack` reads it member by member into a fresh private
folder and refuses, in one line naming the member: an unreadable archive; an absolute path, a
``..`` part or a name that is not plain printable text; a link, device or any member that is not a
regular file or folder; more than :data:`MAX_MEMBERS` members (a zip's count and directory size
are read before zipfile parses the directory) or more than :data:`MAX_UNPACKED_BYTES` unpacked
(by the declared sizes, checked before anything is read, and by the bytes read); compiled code (:data:`COMPILED_SUFFIXES`), and in an sdist any source that
needs a build step (:data:`BUILD_SUFFIXES`). Nothing in an archive is executed here: an sdist's
``setup.py`` is never run. Its importable code is read as it is, from ``src/`` when the sdist has
one, else from its top folder, so code that only a build would generate is missing and fails the
import check. :func:`check_dependencies` then requires every dependency the archive declares (a
wheel's ``Requires-Dist``; an sdist's ``PKG-INFO`` ``Requires-Dist`` and ``pyproject.toml``
``[project] dependencies``) to be installed already, at a version it accepts: nothing is ever
installed from an upload.
"""

from __future__ import annotations

import email.parser
import gzip
import importlib.metadata
import os
import platform
import re
import shutil
import stat
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

from ncbench.errors import NcbenchError

ARCHIVE_KINDS = {".whl": "wheel", ".tar.gz": "sdist"}
MAX_FILE_BYTES = 1 << 20  # the upload cap of one .py file
MAX_ARCHIVE_BYTES = 16 << 20  # and of a wheel or an sdist
MAX_MEMBERS = 2000
MAX_UNPACKED_BYTES = 64 << 20
MAX_MEMBER_NAME = 400
MAX_CENTRAL_DIRECTORY = MAX_MEMBERS * 1024  # a zip's list of members: 46 bytes, the name and extras each
EOCD_SIGNATURE, EOCD_SIZE, EOCD_SEARCH = b"PK\x05\x06", 22, 22 + (1 << 16)  # its end record, comment included
# The decompressed tar stream: the members' bytes plus their headers (512 bytes each, more for
# long names). Capped so that a gzip bomb hidden in a header is cut before it is read into memory.
MAX_TAR_STREAM_BYTES = MAX_UNPACKED_BYTES + (16 << 20)
COMPILED_SUFFIXES = (".so", ".pyd", ".dll", ".dylib", ".pyc", ".pyo")
BUILD_SUFFIXES = (".c", ".cc", ".cpp", ".cxx", ".h", ".hh", ".hpp", ".pyx", ".pxd", ".pxi", ".f", ".f90", ".rs", ".cu")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
CHUNK = 1 << 16
SPEC_FORMS = "FILE.py:Class, or DIST.whl or DIST.tar.gz:module.path:Class"


@dataclass(frozen=True)
class PluginSpec:
    """Where a plugin's attack class is: ``module`` is None for one ``.py`` file."""

    path: Path
    class_name: str
    module: str | None = None

    @property
    def kind(self) -> str:
        """``file``, ``wheel``, ``sdist`` or ``folder``."""
        if self.module is None:
            return "file"
        return archive_kind(self.path.name) or "folder"


@dataclass(frozen=True)
class Distribution:
    """What an archive declares about itself (its METADATA or PKG-INFO, and pyproject.toml)."""

    name: str
    version: str
    requires: tuple[str, ...]  # requirement strings, markers included
    requires_python: str | None


def archive_kind(filename: str) -> str | None:
    """``wheel``, ``sdist`` or None, by the file name's suffix."""
    return next((kind for suffix, kind in ARCHIVE_KINDS.items() if filename.endswith(suffix)), None)


def parse_spec(spec: str) -> PluginSpec | None:
    """The plugin named by ``spec``, or None when it names no file (a registered attack's name).
    Modules and classes hold no colon, so splitting from the right is unambiguous whatever the
    path holds; an archive's suffix is looked for first (``DIST.whl:pkg.py:Class`` names the
    module ``pkg.py``)."""
    if ":" not in spec:
        return None
    head, _, class_name = spec.rpartition(":")
    path_text, sep, module = head.rpartition(":")
    if sep and archive_kind(path_text):
        plugin = PluginSpec(Path(path_text), class_name, module)
    elif head.endswith(".py"):
        plugin = PluginSpec(Path(head), class_name)
    elif sep and Path(path_text).is_dir():
        plugin = PluginSpec(Path(path_text), class_name, module)
    elif sep:
        raise NcbenchError(f"{path_text}: not a .py file, a wheel (.whl), an sdist (.tar.gz) or a folder")
    else:
        raise NcbenchError(
            f"a plugin is {SPEC_FORMS} (e.g. my_attack-0.1-py3-none-any.whl:my_attack.attack:MyAttack); got {spec!r}"
        )
    if plugin.module is not None and not MODULE_NAME.fullmatch(plugin.module):
        raise NcbenchError(f"plugin module {plugin.module!r} must be a dotted Python module name")
    if not class_name.isidentifier():
        raise NcbenchError(f"plugin class {class_name!r} must be a Python identifier")
    return plugin


def check_archive_name(filename: str) -> str:
    """The archive's kind, or NcbenchError: a wheel's file name must carry pure-Python tags
    (``py3-none-any``), an sdist's must be ``NAME-VERSION.tar.gz``."""
    kind = archive_kind(filename)
    try:
        if kind == "wheel":
            tags = parse_wheel_filename(filename)[3]
            if any(tag.abi != "none" or tag.platform != "any" for tag in tags):
                raise NcbenchError(f"{filename} is a platform wheel; plugins are pure Python (tags like py3-none-any)")
        elif kind == "sdist":
            parse_sdist_filename(filename)
        else:
            raise NcbenchError(f"{filename}: a plugin archive is a wheel (.whl) or an sdist (.tar.gz)")
    except (InvalidWheelFilename, InvalidSdistFilename) as error:
        raise NcbenchError(f"{filename} is not a {kind} file name: {error}") from None
    return kind


def prepare(archive: Path, *, filename: str, dest: Path, module: str) -> Distribution:
    """Every check, then ``archive`` unpacked into ``dest`` (created here, removed again on a
    refusal), ready to go on sys.path: its layout and contents, its dependencies, and that
    ``module`` is one of its own."""
    dest.mkdir(mode=0o755)  # refuses an existing folder: nothing but our own is removed below
    try:
        dist = unpack(archive, filename=filename, dest=dest)
        check_dependencies(dist, filename=filename)
        check_entry_module(dest, module, filename=filename)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dist


def unpack(archive: Path, *, filename: str, dest: Path) -> Distribution:
    """Check and unpack a wheel (its whole content) or an sdist (its importable code: ``src/``
    or its top folder) into the empty folder ``dest``. Files are made 0644 and folders 0755
    whatever the archive says, so that the sandbox's unprivileged uid can read them."""
    kind = check_archive_name(filename)
    size = archive.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise NcbenchError(f"{filename} is {size} bytes; a plugin archive is at most {MAX_ARCHIVE_BYTES}")
    if kind == "wheel":
        _unpack_wheel(archive, filename, dest)
        dist = _wheel_distribution(dest, filename)
    else:
        staging = dest.with_name(f".{dest.name}.sdist")  # beside dest: no member can collide with it
        staging.mkdir(mode=0o700)
        try:
            top = _unpack_sdist(archive, filename, staging)
            dist = _sdist_distribution(staging / top, filename)
            source = staging / top / "src" if (staging / top / "src").is_dir() else staging / top
            for entry in source.iterdir():
                os.rename(entry, dest / entry.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for folder, _, files in os.walk(dest):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return dist


def check_dependencies(dist: Distribution, *, filename: str) -> None:
    """Every requirement that applies here (markers evaluated, extras not requested) is an
    installed distribution at an accepted version; else one line naming what is missing."""
    here = platform.python_version()
    if dist.requires_python:
        try:
            accepted = SpecifierSet(dist.requires_python).contains(here, prereleases=True)
        except InvalidSpecifier:
            raise NcbenchError(f"{filename}: invalid Requires-Python {_shown(dist.requires_python)}") from None
        if not accepted:
            raise NcbenchError(f"{filename} requires Python {_shown(dist.requires_python)}; this is Python {here}")
    missing = []
    for text in dist.requires:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            raise NcbenchError(f"{filename}: invalid requirement {_shown(text)}") from None
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{requirement.name} (not installed)")
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            missing.append(f"{requirement.name}{requirement.specifier} (installed: {installed})")
    if missing:
        raise NcbenchError(
            f"{filename} requires {', '.join(missing)}; a plugin's dependencies must already be installed "
            "in the environment it runs in (nothing is installed from an upload)"
        )


def check_entry_module(root: Path, module: str, *, filename: str) -> None:
    """``module`` (a dotted name) is a module of the unpacked archive at ``root``, not one the
    environment would import instead."""
    if not MODULE_NAME.fullmatch(module):
        raise NcbenchError(f"plugin module {_shown(module)} must be a dotted Python module name")
    path = root.joinpath(*module.split("."))
    if not ((path / "__init__.py").is_file() or path.with_name(path.name + ".py").is_file()):
        slashed = "/".join(module.split("."))
        raise NcbenchError(f"{filename} has no module {module} (no {slashed}.py or {slashed}/__init__.py)")


# -- wheels ------------------------------------------------------------------------------------


def _unpack_wheel(archive: Path, filename: str, dest: Path) -> None:
    _check_zip_directory(archive, filename)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
            _check_count(len(members), filename)
            _check_total(sum(m.file_size for m in members), filename)
            for member in members:
                rel = _member_path(member.filename, filename)
                if rel is None:
                    continue
                mode = member.external_attr >> 16
                if member.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise NcbenchError(_not_regular(member.filename, filename, stat.S_IFMT(mode)))
                if member.flag_bits & 0x1:
                    raise NcbenchError(f"{filename}: member {_shown(member.filename)} is encrypted")
                if rel.parts[0].endswith(".data"):
                    raise NcbenchError(
                        f"{filename}: member {_shown(member.filename)} is in a .data folder (scripts, headers, "
                        "data files); a plugin wheel holds packages only"
                    )
                if member.is_dir():
                    _folder(dest, rel, filename)
                    continue
                _check_suffix(rel, filename, build=False)
                with zipped.open(member) as source:
                    _write(dest, rel, source, member.file_size, filename)
    except NcbenchError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a malformed archive makes zipfile raise
        raise NcbenchError(f"{filename} is not a readable wheel (zip): {type(error).__name__}: {error}") from None


def _check_zip_directory(archive: Path, filename: str) -> None:
    """Bound the central directory before zipfile parses it whole into memory: a 16 MiB upload
    of empty members would otherwise be some 200,000 entries, 100 MB of objects. Reads the
    end-of-central-directory record as zipfile finds it (at the end, else the last one in the
    final 64 KiB); when there is none, zipfile says why the file is not a zip."""
    with open(archive, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - EOCD_SEARCH))
        tail = handle.read()
    at = len(tail) - EOCD_SIZE if tail[-EOCD_SIZE:].startswith(EOCD_SIGNATURE) else tail.rfind(EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < EOCD_SIZE:
        return
    entries = int.from_bytes(tail[at + 10 : at + 12], "little")
    directory = int.from_bytes(tail[at + 12 : at + 16], "little")
    _check_count(entries, filename)  # 0xFFFF (zip64) is over the limit too
    if directory > MAX_CENTRAL_DIRECTORY:
        raise NcbenchError(f"{filename} has a central directory of {directory} bytes; at most {MAX_CENTRAL_DIRECTORY}")


def _wheel_distribution(root: Path, filename: str) -> Distribution:
    infos = [path for path in root.iterdir() if path.is_dir() and path.name.endswith(".dist-info")]
    if len(infos) != 1 or not (infos[0] / "METADATA").is_file() or not (infos[0] / "WHEEL").is_file():
        raise NcbenchError(
            f"{filename} is not a wheel: it needs one NAME-VERSION.dist-info folder with METADATA and WHEEL"
        )
    wheel = _headers(infos[0] / "WHEEL", filename)
    if (wheel.get("Root-Is-Purelib") or "").strip().lower() != "true":
        raise NcbenchError(f"{filename}: WHEEL says Root-Is-Purelib is not true; plugins are pure Python")
    metadata = _headers(infos[0] / "METADATA", filename)
    return _distribution(metadata, filename, extra=())


# -- sdists ------------------------------------------------------------------------------------


def _unpack_sdist(archive: Path, filename: str, dest: Path) -> str:
    """Unpack the whole sdist into ``dest`` in one pass over the stream; returns its top folder."""
    top = None
    count = total = 0
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            with tarfile.open(fileobj=_Capped(unzipped, MAX_TAR_STREAM_BYTES, filename), mode="r|") as tar:
                for member in tar:
                    count += 1
                    _check_count(count, filename)
                    rel = _member_path(member.name, filename)
                    if not (member.isdir() or (member.isreg() and not member.issparse())):
                        raise NcbenchError(_not_regular(member.name, filename, _tar_type(member)))
                    total += max(member.size, 0)
                    _check_total(total, filename)
                    if rel is None:
                        continue
                    if top is None:
                        top = rel.parts[0]
                    if rel.parts[0] != top or (len(rel.parts) == 1 and not member.isdir()):
                        raise NcbenchError(
                            f"{filename}: an sdist has one top folder; {_shown(member.name)} is outside it"
                        )
                    if member.isdir():
                        _folder(dest, rel, filename)
                        continue
                    _check_suffix(rel, filename, build=True)
                    _write(dest, rel, tar.extractfile(member), member.size, filename)
    except NcbenchError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a malformed archive makes gzip or tarfile raise
        raise NcbenchError(f"{filename} is not a readable sdist (tar.gz): {type(error).__name__}: {error}") from None
    if top is None or not (dest / top / "PKG-INFO").is_file():
        raise NcbenchError(f"{filename} is not an sdist: it needs one NAME-VERSION folder with PKG-INFO")
    return top


def _sdist_distribution(top: Path, filename: str) -> Distribution:
    """PKG-INFO, and pyproject.toml's ``[project]`` when there is one. Dependencies only a build
    could compute (``dynamic``) cannot be checked without running the build: refused."""
    metadata = _headers(top / "PKG-INFO", filename)
    dynamic = {value.strip().lower() for value in metadata.get_all("Dynamic") or []}
    project = {}
    if (top / "pyproject.toml").is_file():
        try:
            project = tomllib.loads((top / "pyproject.toml").read_text(encoding="utf-8")).get("project") or {}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise NcbenchError(f"{filename}: pyproject.toml does not parse: {_shown(str(error))}") from None
        if not isinstance(project, dict):
            raise NcbenchError(f"{filename}: pyproject.toml's [project] is not a table")
    declared, computed = (_strings(project, field, filename) for field in ("dependencies", "dynamic"))
    if "requires-dist" in dynamic or "dependencies" in computed:
        raise NcbenchError(
            f"{filename} declares its dependencies as dynamic: only a build could list them, and the server "
            "runs no build; list them in pyproject.toml [project] dependencies, or upload a wheel"
        )
    return _distribution(metadata, filename, extra=tuple(declared))


def _strings(project: dict, field: str, filename: str) -> list[str]:
    """pyproject.toml's ``[project]`` ``field``: a list of strings, empty when absent."""
    values = project.get(field, [])
    if not (isinstance(values, list) and all(isinstance(item, str) for item in values)):
        raise NcbenchError(f"{filename}: pyproject.toml's [project] {field} is not a list of strings")
    return values


# -- one member --------------------------------------------------------------------------------


def _member_path(name: str, filename: str) -> PurePosixPath | None:
    """A member's path relative to the extraction root, or None for the root itself; refuses
    anything that could land outside it or that is not plain text."""
    shown = _shown(name)
    if not name or len(name) > MAX_MEMBER_NAME or not name.isprintable() or "\\" in name:
        raise NcbenchError(f"{filename}: member {shown} is not a plain file name")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise NcbenchError(f"{filename}: member {shown} is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise NcbenchError(f"{filename}: member {shown} has a '..' part: it would leave the extraction folder")
    return PurePosixPath(*parts) if parts else None


def _not_regular(name: str, filename: str, kind: str | int) -> str:
    names = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
    what = names.get(kind, kind) if isinstance(kind, int) else kind
    if isinstance(what, int):
        what = f"a special file (mode {what:o})"
    return f"{filename}: member {_shown(name)} is {what}; a plugin archive holds regular files and folders only"


def _tar_type(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isdev():
        return "a device or pipe"
    return "a sparse file" if member.issparse() else f"a member of tar type {member.type!r}"


def _check_count(count: int, filename: str) -> None:
    if count > MAX_MEMBERS:
        raise NcbenchError(f"{filename} has more than {MAX_MEMBERS} members")


def _check_total(total: int, filename: str) -> None:
    if total > MAX_UNPACKED_BYTES:
        raise NcbenchError(f"{filename} unpacks to more than {MAX_UNPACKED_BYTES} bytes (declared: {total})")


def _check_suffix(rel: PurePosixPath, filename: str, *, build: bool) -> None:
    name = rel.name.lower()
    if name.endswith(COMPILED_SUFFIXES) or ".so." in name:
        raise NcbenchError(
            f"{filename}: member {_shown(str(rel))} is compiled code; plugins are pure Python source "
            f"(no {', '.join(COMPILED_SUFFIXES)})"
        )
    if build and name.endswith(BUILD_SUFFIXES):
        raise NcbenchError(
            f"{filename}: member {_shown(str(rel))} needs a build step (an extension's source); the server "
            "builds nothing: plugins are pure Python source"
        )


def _folder(root: Path, rel: PurePosixPath, filename: str) -> Path:
    target = root.joinpath(*rel.parts)
    try:
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as error:
        raise NcbenchError(f"{filename}: member {_shown(str(rel))} cannot be unpacked: {error.strerror}") from None
    return target


def _write(root: Path, rel: PurePosixPath, source, size: int, filename: str) -> None:
    """Copy at most ``size`` bytes (the declared size) of ``source`` into a new file."""
    if size < 0:
        raise NcbenchError(f"{filename}: member {_shown(str(rel))} declares a negative size")
    parent = _folder(root, rel.parent, filename) if rel.parent.parts else root
    try:
        # O_EXCL: a duplicate member fails here instead of replacing the first one.
        handle = os.open(parent / rel.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise NcbenchError(f"{filename}: member {_shown(str(rel))} cannot be unpacked: {error.strerror}") from None
    with os.fdopen(handle, "wb") as out:
        left = size
        while chunk := source.read(min(CHUNK, left + 1)):
            left -= len(chunk)
            if left < 0:
                raise NcbenchError(f"{filename}: member {_shown(str(rel))} is longer than its declared size")
            out.write(chunk)


class _Capped:
    """A read-only stream that refuses to give more than ``limit`` bytes."""

    def __init__(self, stream, limit: int, filename: str):
        self.stream, self.left, self.filename = stream, limit, filename

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(CHUNK if size is None or size < 0 else min(size, self.left + 1))
        self.left -= len(chunk)
        if self.left < 0:
            raise NcbenchError(f"{self.filename} unpacks to more than {MAX_TAR_STREAM_BYTES} bytes of tar stream")
        return chunk


# -- metadata ----------------------------------------------------------------------------------


def _headers(path: Path, filename: str):
    try:
        return email.parser.HeaderParser().parsestr(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NcbenchError(f"{filename}: {path.name} is not UTF-8 text") from None


def _distribution(metadata, filename: str, *, extra: tuple[str, ...]) -> Distribution:
    name, version = metadata.get("Name"), metadata.get("Version")
    if not name or not version:
        raise NcbenchError(f"{filename}: its metadata has no Name or no Version")
    requires = tuple(str(item) for item in metadata.get_all("Requires-Dist") or []) + extra
    python = metadata.get("Requires-Python")
    return Distribution(str(name), str(version), requires, str(python) if python else None)


def _shown(text: str, limit: int = 120) -> str:
    """Someone else's text in a message: quoted, escaped, cut."""
    shown = ascii(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."
