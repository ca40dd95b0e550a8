import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    # `make sanitize` sets this: fail loudly if the tests would not run on the
    # ASan/UBSan build (e.g. the in-place extension shadowed it on sys.path).
    import os

    if os.environ.get("METRICOPS_EXPECT_SANITIZED"):
        import metricops

        assert metricops.build_info()["sanitizers"], f"not the sanitized build: {metricops.__file__}"
        print(f"\nmetricops under test: {metricops.__file__} (ASan+UBSan)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Hypothesis profiles for the property tests: "dev" (default, quick), "ci"
# (selected when the CI environment variable is set) and "random" (selected by
# HYPOTHESIS_PROFILE=random). Tests that pass their own @settings(max_examples=...) keep it.
try:
    import os

    from hypothesis import settings

    settings.register_profile("dev", max_examples=15, deadline=None, derandomize=True)
    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
    # Long runs (HYPOTHESIS_PROFILE=random): new examples each run, many more of them.
    settings.register_profile("random", max_examples=400, deadline=None, derandomize=False, print_blob=True)
    settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
