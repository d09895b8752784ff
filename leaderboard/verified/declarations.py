"""A plugin's declarations read by the host from its source, never from anything it prints.

Admission stores the attack's name and version and checks its tasks and knowledge; a plugin's own
process could print any report, so the host reads the four from the class body's literal
assignments (``name = "..."``, ``tasks = ("reid",)``) with :mod:`ast`, and the sandboxed import
only confirms that the class it imports says the same. Parsing hostile source can itself be a
bomb (deep nesting, huge literals), so :func:`read_declarations` parses in a child interpreter
under memory, CPU, wall-clock and output limits (:func:`leaderboard.isolated.child_lines`):
``python -I -m ncbench.leaderboard.verified.declarations CLASS`` with the source on stdin, one
short JSON line out.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from ncbench.errors import NcbenchError
from ncbench.leaderboard import isolated

DECLARED = ("name", "version", "tasks", "knowledge")
# The parser's own limits: a plugin is at most a few hundred kB of source, and its answer a short
# JSON line (each declared string bounded below).
PARSE_LIMITS = isolated.ChildLimits(memory_bytes=1 << 30, cpu_s=10, wall_s=30, file_bytes=64 << 10)
PARSE_FAILED = "the plugin's source could not be parsed within the parser's limits"
# The longest declarations stored: the store's columns for the attack and its version; a task or
# knowledge word is a short name from a fixed vocabulary.
MAX_DECLARED = {"name": 128, "version": 64}
MAX_WORD, MAX_WORDS = 64, 32


def literal_declarations(source: str, class_name: str) -> dict:
    """``{"attack", "version", "tasks", "knowledge"}`` of the top-level class ``class_name`` in
    ``source``, from literal assignments in its body (strings; tuples or lists of strings), or
    NcbenchError naming what is missing. Inherited or computed values are refused: the host
    could only learn them by running the plugin."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise NcbenchError(f"the plugin's source does not parse ({type(error).__name__})") from None
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name]
    if len(classes) != 1:
        raise NcbenchError(f"the plugin's source has no single top-level class {class_name}")
    found: dict[str, object] = {}
    for statement in classes[0].body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in DECLARED:
            if target.id in found:
                raise NcbenchError(f"class {class_name} assigns {target.id} twice; declare it once")
            found[target.id] = _literal(class_name, target.id, value)
    missing = [name for name in DECLARED if name not in found]
    if missing:
        raise NcbenchError(
            f"class {class_name} must declare {', '.join(missing)} as literals in its own body "
            '(name = "my-attack", version = "1.0", tasks = ("reid",), knowledge = ("architecture",))'
        )
    return {
        "attack": found["name"],
        "version": found["version"],
        "tasks": found["tasks"],
        "knowledge": found["knowledge"],
    }


def _literal(class_name: str, name: str, node: ast.expr):
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        value = None
    if name in MAX_DECLARED and isinstance(value, str):
        if len(value) > MAX_DECLARED[name]:
            raise NcbenchError(f"class {class_name}: {name} is longer than {MAX_DECLARED[name]} characters")
        return value
    if name in ("tasks", "knowledge") and isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        if len(value) > MAX_WORDS or any(len(v) > MAX_WORD for v in value):
            raise NcbenchError(
                f"class {class_name}: {name} holds more than {MAX_WORDS} words or one longer than {MAX_WORD} characters"
            )
        return list(value)
    kind = "a string" if name in ("name", "version") else "a tuple of strings"
    raise NcbenchError(f"class {class_name}: {name} must be {kind} written as a literal")


def module_file(plugin: Path, entry: str) -> Path:
    """The source file of ``entry`` (``Class`` for a .py ``plugin``, ``module:Class`` for an
    unpacked archive's folder)."""
    if not plugin.is_dir():
        return plugin
    module = entry.rpartition(":")[0].split(".")
    for candidate in (plugin.joinpath(*module[:-1], module[-1] + ".py"), plugin.joinpath(*module, "__init__.py")):
        if candidate.is_file():
            return candidate
    raise NcbenchError(f"the plugin has no module {'.'.join(module)}")


def read_declarations(plugin: Path, entry: str) -> dict:
    """:func:`literal_declarations` of ``entry`` in ``plugin``, parsed in a child interpreter
    under limits (the host's own code on the plugin's bytes; none of the plugin runs)."""
    command = [sys.executable, "-I", "-m", "ncbench.leaderboard.verified.declarations", entry.rpartition(":")[2]]
    with module_file(plugin, entry).open("rb") as source:
        lines = isolated.child_lines(command, source, PARSE_LIMITS, died=PARSE_FAILED)
    answer = isolated.last_json(lines)
    if not isinstance(answer, dict):
        raise NcbenchError(PARSE_FAILED)
    if "error" in answer:
        raise NcbenchError(str(answer["error"]))
    return answer


def _main(argv: list[str]) -> int:
    source = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    try:
        answer = literal_declarations(source, argv[0])
    except NcbenchError as error:
        answer = {"error": str(error)}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
