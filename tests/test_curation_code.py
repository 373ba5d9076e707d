"""Repository documents: module names, import extraction, dependency order with cycles, the Markdown-style
document format."""

import random


from internlm2_jax.data.curation.code import (
    analyse_repository,
    module_name,
    order_repository,
    python_imports,
    repository_document,
)

REPO = {
    "README.md": "# demo\n",
    "pkg/__init__.py": '"""The package re-exports its version."""\nfrom pkg.version import VERSION\n',
    "pkg/version.py": 'VERSION = "1.0"\n',
    "pkg/util.py": "import os\nfrom . import version\n\n\ndef helper():\n    return version.VERSION\n",
    # `VERSION` is a name in pkg, not a module: only pkg/__init__ is a dependency.
    "pkg/core.py": "from .util import helper\nfrom pkg import VERSION\n\n\ndef run():\n    return helper()\n",
    "pkg/sub/__init__.py": "",
    # a and b import each other: a cycle.
    "pkg/sub/a.py": "from ..core import run\nfrom . import b\n",
    "pkg/sub/b.py": "def later():\n    import pkg.sub.a\n",
    "main.py": "import pkg.sub.a\nfrom pkg.util import helper\n",
    # A syntax error: the imports are found by the regex fallback.
    "broken.py": "from pkg import core\ndef oops(:\n    pass\nimport pkg.version as v, json\n",
}


def test_module_name():
    assert module_name("pkg/sub/mod.py") == ("pkg.sub.mod", False)
    assert module_name("pkg/__init__.py") == ("pkg", True)
    assert module_name("main.py") == ("main", False)
    assert module_name("src/pkg/mod.py") == ("pkg.mod", False)
    assert module_name("src/pkg/__init__.py") == ("pkg", True)
    assert module_name("__init__.py") == ("", True)


def test_python_imports_resolves_relative_imports():
    source = ("import os.path, json as j\nfrom . import sibling\nfrom .. import cousin\nfrom ..other import name\n"
              "from ...too_far import x\nfrom typing import *\n")
    assert python_imports(source, "pkg.sub.mod", False) == {
        "os.path", "json", "pkg.sub", "pkg.sub.sibling", "pkg", "pkg.cousin", "pkg.other", "pkg.other.name",
        "typing"}
    # In a package's __init__, one dot is the package itself.
    assert python_imports("from . import mod\nfrom .. import up\n", "pkg.sub", True) == {
        "pkg.sub", "pkg.sub.mod", "pkg", "pkg.up"}
    # With the repository's modules known, `from pkg import name` keeps `pkg.name` only when it is a module.
    known = {"pkg", "pkg.mod"}
    assert python_imports("from pkg import mod, CONSTANT\n", "main", False, known) == {"pkg", "pkg.mod"}
    # Imports anywhere count: inside functions and TYPE_CHECKING blocks too.
    assert python_imports("def f():\n    import lazy\nif TYPE_CHECKING:\n    from typed import T\n", "m", False,
                          set()) == {"lazy", "typed"}


def test_python_imports_regex_fallback_on_syntax_errors():
    source = ("from . import x  # comment\nimport a.b as c, d\nfrom ..up import (y,\n    z)\ndef broken(:\n"
              "print 'python 2'\n")
    assert python_imports(source, "pkg.sub.mod", False) == {"pkg.sub", "pkg.sub.x", "a.b", "d", "pkg.up",
                                                            "pkg.up.y"}


def test_every_module_comes_after_its_imports():
    result = analyse_repository(REPO)
    assert sorted(result.paths) == sorted(REPO)
    assert result.cycles == (("pkg/sub/a.py", "pkg/sub/b.py"),)
    assert result.dependencies["pkg/core.py"] == ("pkg/__init__.py", "pkg/util.py")
    assert result.dependencies["broken.py"] == ("pkg/__init__.py", "pkg/core.py", "pkg/version.py")
    assert result.dependencies["pkg/sub/b.py"] == ("pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/a.py")
    position = {path: i for i, path in enumerate(result.paths)}
    in_cycle = {path for cycle in result.cycles for path in cycle}
    checked = 0
    for path, deps in result.dependencies.items():
        for dep in deps:
            if not (path in in_cycle and dep in in_cycle):
                assert position[dep] < position[path], f"{path} comes before its dependency {dep}"
                checked += 1
    assert checked > 10
    # Ties go to the smallest path; the cycle is placed whole, by path; non-Python files last.
    assert list(result.paths) == ["pkg/sub/__init__.py", "pkg/version.py", "pkg/__init__.py", "pkg/util.py",
                                  "pkg/core.py", "broken.py", "pkg/sub/a.py", "pkg/sub/b.py", "main.py",
                                  "README.md"]


def test_order_is_independent_of_insertion_order():
    expected = order_repository(REPO)
    items = list(REPO.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        assert order_repository(dict(items)) == expected


def test_long_import_chain_and_src_layout():
    # 3000 modules in a chain: the SCC search must not recurse per module.
    chain = {f"src/pkg/m{i:04d}.py": f"from . import m{i + 1:04d}\n" for i in range(2999)}
    chain["src/pkg/m2999.py"] = "VALUE = 1\n"
    chain["src/pkg/__init__.py"] = ""
    order = order_repository(chain)
    assert order[:2] == ["src/pkg/__init__.py", "src/pkg/m2999.py"] and order[-1] == "src/pkg/m0000.py"


def test_repository_document_format():
    files = {"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "X = 1\n",
             "NOTES.md": "Use it:\n\n```\nimport pkg\n```\n", "data.xyz": "raw\n"}
    assert repository_document(files, "octo/demo") == (
        "# Repository: octo/demo\n\n"
        "## pkg/__init__.py\n\n```python\n\n```\n\n"
        "## pkg/b.py\n\n```python\nX = 1\n```\n\n"
        "## pkg/a.py\n\n```python\nfrom . import b\n```\n\n"
        "## NOTES.md\n\n````markdown\nUse it:\n\n```\nimport pkg\n```\n````\n\n"
        "## data.xyz\n\n```\nraw\n```\n")


