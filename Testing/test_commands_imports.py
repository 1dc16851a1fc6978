"""Issue 26, item 4: the command line is a package of independent commands. Walking the imports of every
`commands/` module (with `ast`, imports inside functions included, nothing executed) shows no import cycle
through them, no command importing another command (only `commands/common.py`), and no private
(`_underscore`) name taken from another module. The same walk is run on a small package built to break each
rule, so that each check is seen to fail."""

from __future__ import annotations

import ast
from pathlib import Path

import SAMMed2DSegmentLib

LIB = Path(SAMMed2DSegmentLib.__file__).resolve().parent
PACKAGE = "SAMMed2DSegmentLib"
COMMANDS = f"{PACKAGE}.commands"
SHARED = f"{COMMANDS}.common"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package folder `root`, by its dotted name."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join((package, *parts))] = path
    return files


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in the file that lands in the package; a name that
    is itself a module becomes that module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target not in modules:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in modules else (target, alias.name))
    return found


def private_attribute_uses(path: Path, module_aliases: set[str]) -> list[str]:
    """`alias._name` where `alias` is a module imported from the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in module_aliases and node.attr.startswith("_") and not node.attr.startswith("__")
    ]  # fmt: skip


def import_graph(modules: dict[str, Path], start: list[str]) -> dict[str, set[str]]:
    """The package's modules reachable from `start`, each with the package modules it imports."""
    graph: dict[str, set[str]] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        graph[name] = {target for target, _ in imports_of(name, modules[name], modules) if target != name}
        todo += graph[name]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (as a path that ends where it began), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def violations(root: Path, package: str) -> list[str]:
    """Every broken rule of the `commands` sub-package of the package folder `root`, one line each."""
    modules = module_files(root, package)
    commands, shared = f"{package}.commands", f"{package}.commands.common"
    ours = [name for name in modules if name == commands or name.startswith(commands + ".")]
    problems = []
    for name in ours:
        imported = imports_of(name, modules[name], modules)
        for target, symbol in imported:
            if symbol and symbol.startswith("_") and target != name:
                problems.append(f"{name} imports the private name {symbol} from {target}")
            is_command = target.startswith(commands + ".") and target != shared
            if name != commands and is_command and target != name:
                problems.append(f"{name} imports the command module {target}")
        aliases = _module_aliases(modules[name], modules, name)
        problems += [f"{name} uses {use}" for use in private_attribute_uses(modules[name], aliases)]
    cycle = find_cycle(import_graph(modules, ours))
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def _module_aliases(path: Path, modules: dict[str, Path], name: str) -> set[str]:
    """Local names bound to package modules by `from X import module` or `import a.b as c`."""
    aliases = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    targets = {target for target, symbol in imports_of(name, path, modules) if symbol is None}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                if any(t == alias.name or t.endswith("." + alias.name) for t in targets):
                    aliases.add(local)
    return aliases


def test_the_command_modules_are_independent_and_free_of_cycles():
    modules = module_files(LIB, PACKAGE)
    commands = {name for name in modules if name.startswith(COMMANDS + ".")}
    assert {f"{COMMANDS}.{c}" for c in ("common", "segment", "convert", "evaluate", "finetune")} <= commands
    assert f"{PACKAGE}.cli" not in modules  # moved, not kept as a second entry point
    assert violations(LIB, PACKAGE) == []
    # The main module reaches every command through the package, and every command reaches `common`.
    graph = import_graph(modules, [COMMANDS])
    assert commands <= graph[COMMANDS] | {SHARED}
    assert all(SHARED in graph[name] for name in commands - {SHARED})


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_walk_finds_a_cycle_a_command_import_and_private_names(tmp_path):
    _write(tmp_path, {
        "__init__.py": "",
        "engine.py": "def _helper(): ...\n",
        "commands/__init__.py": "from . import one, two\n",
        "commands/common.py": "def shared(): ...\n",
        "commands/one.py": "from .common import shared\n\ndef run():\n    from .two import run_two\n",
        "commands/two.py": "from .. import engine\nfrom ..engine import _helper\n\ndef run_two():\n"
                           "    from .one import run\n    return engine._helper\n",
    })  # fmt: skip
    found = violations(tmp_path, "pkg")
    assert "pkg.commands.one imports the command module pkg.commands.two" in found
    assert "pkg.commands.two imports the command module pkg.commands.one" in found
    assert "pkg.commands.two imports the private name _helper from pkg.engine" in found
    assert "pkg.commands.two uses engine._helper" in found
    assert "import cycle: pkg.commands.one -> pkg.commands.two -> pkg.commands.one" in found
    assert len(found) == 5, found


def test_a_cycle_through_a_module_outside_commands_is_found(tmp_path):
    _write(tmp_path, {
        "__init__.py": "",
        "engine.py": "from .commands.common import shared\n",
        "commands/__init__.py": "",
        "commands/common.py": "def shared():\n    from ..engine import run\n",
    })  # fmt: skip
    assert violations(tmp_path, "pkg") == [
        "import cycle: pkg.commands.common -> pkg.engine -> pkg.commands.common"
    ]
