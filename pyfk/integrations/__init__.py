"""Adapters that let other active-learning libraries call pyfk's strategies.

Each submodule imports its library only when imported itself; none of these libraries is a
dependency of pyfk (install the one you use):

    pyfk.integrations.small_text   small-text's QueryStrategy
    pyfk.integrations.skactiveml   scikit-activeml's SingleAnnotatorPoolQueryStrategy
    pyfk.integrations.modal        a modAL query strategy function
    pyfk.integrations.baal         a baal heuristic (with its get_probabilities)

Every adapter reaches every pyfk strategy. Those that read more than class probabilities read the
torch model, found inside the peer's classifier (or given as model=); TorchClassifier (torch and
scikit-learn only) makes a torch module an sklearn classifier those loops accept.
"""

from pyfk.integrations.torch_classifier import TorchClassifier

__all__ = ["TorchClassifier"]
