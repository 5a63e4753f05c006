"""Every test carries exactly one layer marker (``unit``, ``process`` or ``kernel``), from
the directory it sits in: ``pytest -m unit`` then runs every fast test and nothing else."""

from __future__ import annotations

from types import SimpleNamespace

from ..conftest import LAYER_MARKERS, layer_markers_of


def without_one_layer(items) -> list[str]:
    return [f"{item.nodeid}: {layer_markers_of(item) or 'no layer marker'}"
            for item in items if len(layer_markers_of(item)) != 1]


def test_every_collected_test_has_exactly_one_layer_marker(request):
    # The tests of this session (all of them, unless -m or -k chose fewer).
    assert not without_one_layer(request.session.items)


def test_this_test_is_a_unit_test(request):
    assert layer_markers_of(request.node) == ["unit"]


def fake_item(nodeid: str, *names: str) -> SimpleNamespace:
    marks = [SimpleNamespace(name=name) for name in names]
    return SimpleNamespace(nodeid=nodeid, iter_markers=lambda: iter(marks))


def test_a_test_with_no_layer_or_two_layers_is_reported():
    items = [fake_item("tests/test_loose.py::test_a", "parametrize"),
             fake_item("tests/unit/test_b.py::test_b", "unit", "process"),
             fake_item("tests/unit/test_c.py::test_c", "unit", "skipif")]
    assert without_one_layer(items) == [
        "tests/test_loose.py::test_a: no layer marker",
        "tests/unit/test_b.py::test_b: ['unit', 'process']",
    ]


def test_the_layer_markers_are_registered(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert set(LAYER_MARKERS) <= registered
