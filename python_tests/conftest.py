"""Runs the tests marked ``every_cpu_isa`` once per instruction-set variant of the CPU kernels that
this machine supports (titans_ext.supported_cpu_isas()), so the variant a user's machine picks is
one that was tested; every other test runs on the native variant only."""

import pytest

import titans_ext


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("every_cpu_isa"):
        metafunc.parametrize("cpu_isa_variant", titans_ext.supported_cpu_isas(), indirect=True,
                             ids=lambda name: f"isa-{name}")


@pytest.fixture(autouse=True)
def cpu_isa_variant(request):
    """The variant the test runs under: its parameter for every_cpu_isa tests, else the native one."""
    name = getattr(request, "param", None)
    if name is None:
        yield titans_ext.cpu_isa()
        return
    previous = titans_ext.cpu_isa()
    titans_ext.set_cpu_isa(name)
    try:
        yield name
    finally:
        titans_ext.set_cpu_isa(previous)
