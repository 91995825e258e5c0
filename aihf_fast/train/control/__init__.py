"""AIHF for control: a reward r_theta(s, a) and a policy learned from demonstrations and segment
preferences on the batched MuJoCo rollouts (``aihf_fast.envs``).

    data.py     trajectories and Bradley-Terry-labelled segment pairs (.npz with metadata)
    reward.py   RewardModel r_theta(s, a[, s']) and the one reward-step loss of irl / rlhf / aihf
    ppo.py      PPO on the C++ batched rollouts (the RL solver every method shares), evaluation
    datagen.py  demonstrations and preferences drawn from an expert run's snapshots
    trainer.py  the methods expert / bc / irl / rlhf / aihf; config.py, cli.py
"""
from .data import ControlDataError, SegmentPairs, Trajectories, sample_segment_pairs
from .reward import METHOD_WEIGHTS, RewardModel, reward_step_loss, segment_returns

__all__ = ["ControlDataError", "METHOD_WEIGHTS", "RewardModel", "SegmentPairs", "Trajectories",
           "reward_step_loss", "sample_segment_pairs", "segment_returns"]
