"""The architecture check: read a package's modules with ``ast`` (nothing is imported) and
report every import cycle between its modules, every import against the layer order and
every reach into another module's private names.

Every import counts, wherever it stands: at the top, inside a function, or under
``if TYPE_CHECKING:`` (a cycle in the types is a cycle in the design).  Each finding names
the modules and the file and line of the import that makes it, so a failure says where to
look.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# shardlog's layers, lowest first: a module may import from its own layer and from the
# layers before it, never from a later one.
LAYERS = ("wire", "storage", "observability", "log", "server", "tools", "harness", "cli")
# Outside the layers, importable by all and importing nothing of the package: the root
# package (``__version__``) and the package data directory.
COMMON = ("", "data")


@dataclass(frozen=True)
class Import:
    """One import statement's dependency: ``importer`` needs ``target`` (both modules of
    the package), written at ``path:line``."""

    importer: str
    target: str
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[Import] = field(default_factory=list)


def discover(package_dir: Path) -> dict[str, Module]:
    """Every module of the package at ``package_dir``, by dotted name."""
    package_dir = package_dir.resolve()
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path, is_package)
    return modules


def display_path(module: Module, package_dir: Path) -> str:
    return str(module.path.relative_to(package_dir.resolve().parent))


def _containing_module(dotted: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package: ``pkg.a.NAME``
    names something in ``pkg.a``."""
    while dotted:
        if dotted in modules:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def _from_base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from, relative levels resolved."""
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _ModuleReader(ast.NodeVisitor):
    """Collects one module's imports of package modules, the names it binds to package
    modules, and its reaches into other modules' private names."""

    def __init__(self, module: Module, modules: dict[str, Module], path: str):
        self.module = module
        self.modules = modules
        self.path = path
        # A local name (or dotted chain, for ``import pkg.a.b``) -> the module it is.
        self.aliases: dict[str, str] = {}
        self.private_reaches: list[str] = []

    def _depend(self, target: str, line: int) -> None:
        # Importing one's own package (or an enclosing one) is not a dependency on another
        # module: Python has already run those __init__ files.
        if target == self.module.name or self.module.name.startswith(target + "."):
            return
        self.module.imports.append(Import(self.module.name, target, self.path, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _containing_module(alias.name, self.modules)
            if target is None:
                continue
            self._depend(target, node.lineno)
            if alias.asname:
                self.aliases[alias.asname] = target
            else:
                # ``import pkg.a.b`` binds ``pkg``; ``pkg.a.b.x`` then reads module pkg.a.b.
                parts = alias.name.split(".")
                for end in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:end])
                    if prefix in self.modules:
                        self.aliases[prefix] = prefix

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _from_base(self.module, node)
        base_module = _containing_module(base, self.modules)
        if base_module is None:
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.modules:
                self._depend(submodule, node.lineno)
                self.aliases[alias.asname or alias.name] = submodule
                sibling = submodule.rpartition(".")[0] == self.module.name.rpartition(".")[0]
                if _is_private(alias.name) and not sibling:
                    self.private_reaches.append(
                        f"{self.path}:{node.lineno}: {self.module.name} imports private "
                        f"module {submodule} of another package")
                continue
            self._depend(base_module, node.lineno)
            if _is_private(alias.name) and base_module != self.module.name:
                self.private_reaches.append(
                    f"{self.path}:{node.lineno}: {self.module.name} imports private name "
                    f"{alias.name} from {base_module}")

    def _dotted(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            head = self._dotted(node.value)
            return None if head is None else f"{head}.{node.attr}"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = self._dotted(node.value)
        target = self.aliases.get(owner) if owner is not None else None
        if target is not None and _is_private(node.attr) and target != self.module.name:
            self.private_reaches.append(
                f"{self.path}:{node.lineno}: {self.module.name} reads private name "
                f"{target}.{node.attr}")
        self.generic_visit(node)


def layer_of(module_name: str, package: str, layers: Sequence[str] = LAYERS,
             common: Sequence[str] = COMMON) -> str | None:
    """The layer a module belongs to (its first name below the package), ``""`` for the
    common ground outside the layers, None for a module that belongs nowhere."""
    first = module_name.removeprefix(package).removeprefix(".").split(".")[0]
    if first in common:
        return ""
    return first if first in layers else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm,
    iterative: the graph's depth is not the recursion limit's business)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def check(package_dir: Path, layers: Sequence[str] = LAYERS,
          common: Sequence[str] = COMMON) -> list[str]:
    """Every violation in the package at ``package_dir``, one message each (empty: none)."""
    package_dir = Path(package_dir)
    package = package_dir.resolve().name
    modules = discover(package_dir)
    problems: list[str] = []
    for module in modules.values():
        path = display_path(module, package_dir)
        reader = _ModuleReader(module, modules, path)
        reader.visit(ast.parse(module.path.read_text(), filename=str(module.path)))
        problems.extend(reader.private_reaches)
        if layer_of(module.name, package, layers, common) is None:
            problems.append(f"{path}: {module.name} is in no layer (layers: "
                            f"{' < '.join(layers)})")

    rank = {layer: position for position, layer in enumerate(layers)}
    rank[""] = -1
    for module in modules.values():
        mine = layer_of(module.name, package, layers, common)
        if mine is None:
            continue
        for dependency in module.imports:
            theirs = layer_of(dependency.target, package, layers, common)
            if theirs is None:
                continue
            if rank[theirs] > rank[mine] or (mine == "" and theirs != ""):
                problems.append(
                    f"{dependency.where}: {module.name} ({mine or 'common'}) imports "
                    f"{dependency.target} ({theirs}), against the layer order "
                    f"{' < '.join(layers)}")

    problems.extend(_cycle_messages(modules.values()))
    return problems


def _cycle_messages(modules: Iterable[Module]) -> list[str]:
    graph: dict[str, set[str]] = {}
    first_import: dict[tuple[str, str], Import] = {}
    for module in modules:
        graph.setdefault(module.name, set())
        for dependency in module.imports:
            graph[module.name].add(dependency.target)
            graph.setdefault(dependency.target, set())
            first_import.setdefault((module.name, dependency.target), dependency)
    messages = []
    for component in _cycles(graph):
        members = set(component)
        edges = [first_import[(importer, target)]
                 for importer in component for target in sorted(graph[importer] & members)]
        detail = "; ".join(f"{edge.importer} imports {edge.target} at {edge.where}"
                           for edge in edges)
        messages.append(f"import cycle between {', '.join(component)}: {detail}")
    return messages
