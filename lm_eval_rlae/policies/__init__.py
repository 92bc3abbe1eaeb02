"""Weight policies: what sets the members' weights for each span (see `base`)."""

from lm_eval_rlae.policies.base import FixedPolicy, PerplexityPolicy, PolicyState, UniformPolicy, WeightPolicy, make_policy

__all__ = ["FixedPolicy", "PerplexityPolicy", "PolicyState", "UniformPolicy", "WeightPolicy", "make_policy"]
