"""AIHF for control: a reward r_theta(s, a) and a policy learned from demonstrations and segment
preferences on the batched MuJoCo rollouts (``aihf_fast.envs``).

This package holds, so far, the data side (trajectories, Bradley-Terry-labelled segment pairs,
``.npz`` files) and the reward side (``RewardModel`` and the one reward-step loss of the irl,
rlhf and aihf methods). The RL solver, the expert/data pipeline and the trainer come next.
"""
from .data import ControlDataError, SegmentPairs, Trajectories, sample_segment_pairs
from .reward import METHOD_WEIGHTS, RewardModel, reward_step_loss, segment_returns

__all__ = ["ControlDataError", "METHOD_WEIGHTS", "RewardModel", "SegmentPairs", "Trajectories",
           "reward_step_loss", "sample_segment_pairs", "segment_returns"]
