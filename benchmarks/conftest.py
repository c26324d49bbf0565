"""pytest configuration for the benchmark suite (run it explicitly: `pytest benchmarks/`)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large: the issue's full size (M=1000, N=50000, L=64/128/256/512); deselect with -m 'not large'")
