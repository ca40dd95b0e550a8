"""docs/API.md, the users' reference, names every public function, module and drop-in class."""

import inspect
import pathlib

import metricops
import metricops.distributed
import metricops.nn
import metricops.pml
import metricops.retrieval

API = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text()


def _public(module, kinds):
    for name, obj in vars(module).items():
        if not name.startswith("_") and kinds(obj) and getattr(obj, "__module__", "").startswith(module.__name__):
            yield name


def test_api_reference_names_every_public_name():
    names = [n for n in metricops.__all__ if callable(getattr(metricops, n)) and n != "build_info"]
    names += list(_public(metricops.retrieval, inspect.isfunction))
    names += list(_public(metricops.distributed, lambda o: inspect.isfunction(o) or inspect.isclass(o)))
    names += list(_public(metricops.nn, inspect.isclass))
    for sub in ("losses", "miners", "distances", "reducers"):
        module = getattr(metricops.pml, sub, None)
        if module is not None:
            names += [n for n in _public(module, inspect.isclass) if not n.startswith("Base")]
    missing = sorted({n for n in names if f"{n}" not in API})
    assert not missing, f"docs/API.md does not mention {missing}"
