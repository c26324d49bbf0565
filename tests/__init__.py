"""pyfk's tests. A regular package, so that `tests.conftest` is this one even when another
distribution installs a top-level `tests` package into site-packages (small-text 1.4.1 does).
"""
