"""Adapters that let other active-learning libraries call pyfk's strategies.

Each submodule imports its library only when imported itself; none of these libraries is a
dependency of pyfk (install the one you use):

    pyfk.integrations.small_text   small-text's QueryStrategy
    pyfk.integrations.skactiveml   scikit-activeml's SingleAnnotatorPoolQueryStrategy
"""
