"""Weight policies: what sets the members' weights for each span (see `base`)."""

from lm_eval_rlae.policies.base import FixedPolicy, PolicyState, UniformPolicy, WeightPolicy, make_policy

__all__ = ["FixedPolicy", "PolicyState", "UniformPolicy", "WeightPolicy", "make_policy"]
