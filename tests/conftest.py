"""Shared test configuration: the device option, the ``cuda`` marker, hypothesis profiles.

* ``pytest --device cuda`` (or ``TENSORFOLD_TEST_DEVICE=cuda``) runs every test that takes
  the ``device`` fixture on the GPU; without a GPU those tests skip with a reason.
* Tests marked ``@pytest.mark.cuda`` need a GPU whatever ``--device`` says, and skip
  cleanly where none is present. Tests taking ``device`` get the ``device`` marker, so
  ``pytest --device cuda -m "device or cuda"`` runs just the GPU-relevant part.
* Hypothesis: the ``fast`` profile (the default here) keeps example counts small;
  ``CI=true`` selects the derandomized ``ci`` profile; ``--hypothesis-profile=thorough``
  runs many more examples.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICES = ("cpu", "cuda")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("TENSORFOLD_TEST_DEVICE", "cpu"),
        choices=DEVICES,
        help="device for the tests that take the `device` fixture (env: TENSORFOLD_TEST_DEVICE)",
    )


try:  # hypothesis is a test extra; its tests skip without it
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
else:  # registered at import, before hypothesis' plugin reads --hypothesis-profile
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("fast", max_examples=40, **_common)
    settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
    settings.register_profile("thorough", max_examples=1000, **_common)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: takes the `device` fixture (set automatically)")
    if settings is not None and config.getoption("hypothesis_profile", None) is None:
        ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
        settings.load_profile("ci" if ci else "fast")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)  # so `-m device` selects what --device moves
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device chosen by ``--device`` / ``TENSORFOLD_TEST_DEVICE`` (default cpu)."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda was given, but no CUDA device is present")
    return torch.device(name)
