"""Shared pytest options."""


def pytest_addoption(parser):
    parser.addoption("--soak-minutes", type=float, default=None,
                     help="run tests/test_fuzz_soak.py for this many minutes instead of its short CI budget")
