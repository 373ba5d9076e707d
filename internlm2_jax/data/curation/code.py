"""Repository-level code documents (InternLM2 report §3.1.2): the files of one repository are concatenated in
import-dependency order, so a long-context sample reads a module's dependencies before the module itself, and all
of them are written in one Markdown-style format.

- `module_name` and `python_imports` read a Python file's place in the repository and what it imports;
  `IMPORT_EXTRACTORS` maps a file suffix to those two, so another language plugs in with one entry.
- `analyse_repository` / `order_repository` sort the files topologically (strongly connected components for
  import cycles, every tie broken by path) and `repository_document` writes the ordered files out.
- Nothing here touches the filesystem: `sources.py` reads code trees (a repository per work unit).
"""

from __future__ import annotations

import ast
import dataclasses
import heapq
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping

_IMPORT_LINE = re.compile(r"^[ \t]*import[ \t]+([\w. \t,]+)", re.MULTILINE)
_FROM_LINE = re.compile(r"^[ \t]*from[ \t]+(\.*)[ \t]*([\w.]*)[ \t]+import[ \t]+\(?([\w. \t,*]+)", re.MULTILINE)


def module_name(path: str) -> tuple[str, bool]:
    """The dotted module a repository-relative `.py` path defines, and whether it is a package (`__init__.py`).

    `pkg/sub/mod.py` -> ("pkg.sub.mod", False); `pkg/__init__.py` -> ("pkg", True). A leading `src/` directory is
    dropped (`src/pkg/mod.py` -> "pkg.mod"): in the src layout the importable packages live below it, and no code
    imports `src.pkg`. An `__init__.py` at the repository root names the empty module "".
    """
    parts = path.replace("\\", "/").split("/")
    if len(parts) > 1 and parts[0] == "src":
        parts = parts[1:]
    parts[-1] = parts[-1].rsplit(".", 1)[0]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _resolve(level: int, name: str, module: str, is_package: bool) -> str | None:
    """The absolute module of `from <level dots><name> import ...` in `module`; None if it climbs above the top."""
    if level == 0:
        return name or None
    # One dot is the package the file belongs to: the package itself for an `__init__`, else the module's parent.
    # Each further dot climbs one package up, and Python refuses to climb above the top-level package.
    package = module.split(".") if module else []
    if not is_package:
        package = package[:-1]
    if level > len(package):
        return None
    return ".".join(package[:len(package) - (level - 1)] + ([name] if name else []))


def python_imports(source: str, module: str, is_package: bool,
                   known_modules: Collection[str] | None = None) -> set[str]:
    """Absolute names of the modules a Python file imports, relative imports resolved against `module`.

    Every import statement counts, including ones inside functions and `if TYPE_CHECKING:` blocks: for reading
    order a type reference is a dependency too. `from pkg import name` gives `pkg` and, because `name` may be a
    submodule or just an attribute, also `pkg.name` when `known_modules` is None or contains it. A file that does
    not parse (a syntax error, or Python 2) falls back to a line-by-line regex scan of its import statements.
    """
    imports: set[str] = set()

    def add_from(level: int, name: str, imported: Iterable[str]):
        base = _resolve(level, name, module, is_package)
        if base is None:
            return
        imports.add(base)
        for item in imported:
            if item != "*" and (known_modules is None or f"{base}.{item}" in known_modules):
                imports.add(f"{base}.{item}")

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        for match in _IMPORT_LINE.finditer(source):
            imports.update(_names(match.group(1)))
        for match in _FROM_LINE.finditer(source):
            add_from(len(match.group(1)), match.group(2), _names(match.group(3)))
        return imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            add_from(node.level, node.module or "", [alias.name for alias in node.names])
    return imports


def _names(import_list: str) -> list[str]:
    # "a.b as c, d" -> ["a.b", "d"]; anything that is not a dotted name (a trailing comment's words) is dropped.
    names = [part.split()[0] for part in import_list.split(",") if part.split()]
    return [name for name in names if re.fullmatch(r"\*|\w+(\.\w+)*", name)]


@dataclasses.dataclass(frozen=True)
class ImportExtractor:
    """How one language's files name themselves and find what they import (see `module_name`, `python_imports`)."""

    module_name: Callable[[str], tuple[str, bool]]
    imports: Callable[[str, str, bool, Collection[str] | None], set[str]]


# Files with other suffixes have no dependency edges and go after the ordered code. All extractors' module names
# share one namespace, so a language whose modules could collide with Python's should prefix its names.
IMPORT_EXTRACTORS: dict[str, ImportExtractor] = {".py": ImportExtractor(module_name, python_imports)}


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


@dataclasses.dataclass(frozen=True)
class RepositoryOrder:
    """`paths`: every file, dependencies first. `cycles`: groups of files that import each other, each by path.
    `dependencies`: path -> the in-repository files it imports, by path (empty without an import extractor)."""

    paths: tuple[str, ...]
    cycles: tuple[tuple[str, ...], ...]
    dependencies: Mapping[str, tuple[str, ...]]


def analyse_repository(files: Mapping[str, str]) -> RepositoryOrder:
    """Orders a repository's files (path -> source) so that each comes after the in-repository files it imports.

    Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so those count as dependencies too. Files
    that import each other (a strongly connected component of the import graph) cannot all come after each other:
    the group is placed as a whole, its files by path, and reported in `cycles`. Among files whose dependencies
    are all placed, the smallest path goes first, so the order depends only on the contents, not on the mapping's
    order. Files without an import extractor follow, by path.
    """
    paths = sorted(files)
    code = [path for path in paths if _suffix(path) in IMPORT_EXTRACTORS]
    modules: dict[str, str] = {}  # module -> path; of duplicates (`pkg/m.py`, `src/pkg/m.py`) the first path wins
    names = {}
    for path in code:
        names[path] = IMPORT_EXTRACTORS[_suffix(path)].module_name(path)
        modules.setdefault(names[path][0], path)
    dependencies = {}
    for path in code:
        module, is_package = names[path]
        found = set()
        for name in IMPORT_EXTRACTORS[_suffix(path)].imports(files[path], module, is_package, modules):
            parts = name.split(".")
            found.update(modules[prefix] for prefix in (".".join(parts[:k]) for k in range(1, len(parts) + 1))
                         if prefix in modules)
        found.discard(path)  # a module importing its own name (e.g. a package re-importing itself) is no edge
        dependencies[path] = tuple(sorted(found))
    rest = [path for path in paths if _suffix(path) not in IMPORT_EXTRACTORS]
    dependencies.update((path, ()) for path in rest)
    components = _strongly_connected(code, dependencies)
    ordered = [path for component in _topological(components, dependencies) for path in component]
    cycles = tuple(tuple(component) for component in components if len(component) > 1)
    return RepositoryOrder(tuple(ordered + rest), cycles, dependencies)


def order_repository(files: Mapping[str, str]) -> list[str]:
    """The paths of `files` in dependency order; see `analyse_repository`, which also reports cycles."""
    return list(analyse_repository(files).paths)


def _strongly_connected(nodes: list[str], edges: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (deep import chains would overflow Python's recursion limit); each component
    is sorted by path and the list of components sorted by first path, so the result is canonical."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(edges[succ])))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def _topological(components: list[list[str]], edges: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
    """Kahn's algorithm over the components, always placing the ready component with the smallest first path."""
    owner = {path: i for i, component in enumerate(components) for path in component}
    waiting_on = [set() for _ in components]  # component -> components it still needs placed first
    needed_by = [set() for _ in components]
    for i, component in enumerate(components):
        for path in component:
            for dep in edges[path]:
                if owner[dep] != i:
                    waiting_on[i].add(owner[dep])
                    needed_by[owner[dep]].add(i)
    ready = [i for i, waits in enumerate(waiting_on) if not waits]  # component indices sort as their first paths
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(components[i])
        for j in needed_by[i]:
            waiting_on[j].discard(i)
            if not waiting_on[j]:
                heapq.heappush(ready, j)
    return ordered


_FENCE_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".md": "markdown", ".rst": "rst", ".txt": "text", ".toml": "toml",
    ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".cfg": "ini", ".ini": "ini", ".sh": "bash", ".c": "c",
    ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".rs": "rust", ".go": "go", ".java": "java",
    ".js": "javascript", ".ts": "typescript", ".html": "html", ".css": "css", ".sql": "sql",
}


def repository_document(files: Mapping[str, str], repo_name: str) -> str:
    """One Markdown-style document holding a whole repository, its files in `order_repository` order:

        # Repository: <repo_name>

        ## <path>

        ```<language>
        <source>
        ```

    and so on for every file, sections separated by a blank line. The language comes from the suffix (empty when
    unknown). A file that itself contains a run of backticks gets a longer fence, so it cannot close the block.
    """
    sections = [f"# Repository: {repo_name}"]
    for path in order_repository(files):
        source = files[path].strip("\n")
        longest = max((len(run) for run in re.findall(r"`{3,}", source)), default=2)
        fence = "`" * (longest + 1)
        sections.append(f"## {path}\n\n{fence}{_FENCE_LANGUAGES.get(_suffix(path), '')}\n{source}\n{fence}")
    return "\n\n".join(sections) + "\n"
