"""Flows over token sequences on the probability simplex: the Gumbel-softmax path, the :class:`SimplexFlow` base
and its sampler (``simplex``), and a trained endpoint network with its training loop (``network``). The exact
analytic simplex prior is in :mod:`guidance.analytic.categorical`."""

from .network import EndpointNetwork, NetworkSimplexFlow, train_simplex_flow
from .simplex import GumbelSoftmaxPath, SequenceSample, SimplexFlow, check_simplex, sample_sequences

__all__ = ["EndpointNetwork", "GumbelSoftmaxPath", "NetworkSimplexFlow", "SequenceSample", "SimplexFlow",
           "check_simplex", "sample_sequences", "train_simplex_flow"]
