"""shardlog's architecture, checked on its source (tests/unit/architecture.py): no import
cycle between its modules, imports only from a layer before one's own (wire < storage <
observability < log < server < tools < harness < cli), and no module reaching into
another's private names.  The checker itself is proved on small fake packages."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..conftest import PROJECT
from .architecture import check

LAYER_ORDER = "against the layer order"


def shardlog_problems(*kinds: str) -> str:
    """The findings of these kinds in shardlog/, one a line (empty: none)."""
    return "\n".join(problem for problem in check(PROJECT / "shardlog")
                     if any(kind in problem for kind in kinds))


def test_shardlog_has_no_import_cycle():
    problems = shardlog_problems("import cycle")
    assert not problems, f"\n{problems}"


def test_shardlog_imports_only_from_its_own_or_an_earlier_layer():
    problems = shardlog_problems(LAYER_ORDER, "in no layer")
    assert not problems, f"\n{problems}"


def test_no_shardlog_module_reaches_into_anothers_private_names():
    problems = shardlog_problems("private")
    assert not problems, f"\n{problems}"


# -- the checker, on fake packages ----------------------------------------------------------


def make_package(root: Path, files: dict[str, str], name: str = "fakepkg") -> Path:
    """A package ``name`` under ``root`` with ``files`` (paths relative to it); every
    directory gets an ``__init__.py``."""
    package = root / name
    for relative, source in {"__init__.py": "", **files}.items():
        path = package / relative
        for directory in [path.parent, *path.parent.parents]:
            if directory == root:
                break
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    return package


def test_a_clean_package_passes(tmp_path):
    package = make_package(tmp_path, {
        "wire/codec.py": "import struct\nfrom fakepkg import __version__\n",
        "storage/store.py": "from fakepkg.wire import codec\nfrom ..wire.codec import X\n",
        "server/front.py": "import fakepkg.storage.store\nfakepkg.storage.store.public\n",
        "server/worker.py": "from . import front\nfront.shared = 1\n",
        "cli.py": "from fakepkg.server import front, worker\nfront.run()\n",
    })
    assert check(package) == []


def test_a_cycle_is_reported_with_each_import_and_its_line(tmp_path):
    package = make_package(tmp_path, {
        "server/front.py": "import os\n\nfrom fakepkg.server import worker\n",
        "server/worker.py": """\
            from __future__ import annotations
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from .front import Front
        """,
    })
    assert check(package) == [
        "import cycle between fakepkg.server.front, fakepkg.server.worker: "
        "fakepkg.server.front imports fakepkg.server.worker at fakepkg/server/front.py:3; "
        "fakepkg.server.worker imports fakepkg.server.front at fakepkg/server/worker.py:5"
    ]


def test_a_cycle_through_three_modules_and_a_function_body_is_reported(tmp_path):
    package = make_package(tmp_path, {
        "tools/a.py": "from fakepkg.tools import b\n",
        "tools/b.py": "import fakepkg.tools.c as c\n",
        "tools/c.py": "def late():\n    from fakepkg.tools.a import thing\n",
    })
    (problem,) = check(package)
    assert problem.startswith("import cycle between fakepkg.tools.a, fakepkg.tools.b, "
                              "fakepkg.tools.c:")
    assert "fakepkg.tools.c imports fakepkg.tools.a at fakepkg/tools/c.py:2" in problem


def test_an_import_from_a_later_layer_is_reported_where_it_is(tmp_path):
    package = make_package(tmp_path, {
        "server/front.py": "x = 1\n\nfrom fakepkg.tools.status import show\n",
        "tools/status.py": "def show(): ...\n",
        "wire/codec.py": "def f():\n    import fakepkg.log.table\n",
        "log/table.py": "",
    })
    assert check(package) == [
        "fakepkg/server/front.py:3: fakepkg.server.front (server) imports "
        "fakepkg.tools.status (tools), against the layer order "
        "wire < storage < observability < log < server < tools < harness < cli",
        "fakepkg/wire/codec.py:2: fakepkg.wire.codec (wire) imports fakepkg.log.table "
        "(log), against the layer order "
        "wire < storage < observability < log < server < tools < harness < cli",
    ]


def test_a_module_outside_every_layer_is_reported(tmp_path):
    package = make_package(tmp_path, {"helpers.py": ""})
    assert check(package) == [
        "fakepkg/helpers.py: fakepkg.helpers is in no layer (layers: "
        "wire < storage < observability < log < server < tools < harness < cli)"
    ]


def test_private_names_reached_every_way_are_reported(tmp_path):
    package = make_package(tmp_path, {
        "wire/codec.py": "_HIDDEN = 1\n",
        "storage/a.py": "from fakepkg.wire.codec import _HIDDEN\n",
        "storage/b.py": "from ..wire.codec import OK, _HIDDEN as H\n",
        "storage/c.py": "from fakepkg.wire import codec\n\ncodec._HIDDEN\n",
        "storage/d.py": "import fakepkg.wire.codec as wc\nprint(wc._HIDDEN, wc.__name__)\n",
        "storage/e.py": "import fakepkg.wire.codec\n\n\nfakepkg.wire.codec._HIDDEN = 2\n",
        "storage/f.py": "from fakepkg.wire import _impl\n",
        "wire/_impl.py": "",
        "wire/frames.py": "from . import _impl\n",  # its own package's private module
    })
    assert check(package) == [
        "fakepkg/storage/a.py:1: fakepkg.storage.a imports private name _HIDDEN from "
        "fakepkg.wire.codec",
        "fakepkg/storage/b.py:1: fakepkg.storage.b imports private name _HIDDEN from "
        "fakepkg.wire.codec",
        "fakepkg/storage/c.py:3: fakepkg.storage.c reads private name "
        "fakepkg.wire.codec._HIDDEN",
        "fakepkg/storage/d.py:2: fakepkg.storage.d reads private name "
        "fakepkg.wire.codec._HIDDEN",
        "fakepkg/storage/e.py:4: fakepkg.storage.e reads private name "
        "fakepkg.wire.codec._HIDDEN",
        "fakepkg/storage/f.py:1: fakepkg.storage.f imports private module "
        "fakepkg.wire._impl of another package",
    ]


def test_private_attributes_of_objects_and_other_libraries_are_not_reaches(tmp_path):
    package = make_package(tmp_path, {
        "wire/codec.py": """\
            import os

            from fakepkg.wire import frames

            def f(obj):
                obj._cache.clear()
                frames.Frame()._buffer
                os._exit(0)
        """,
        "wire/frames.py": "",
    })
    assert check(package) == []
