"""Options of the control trainer (``python -m aihf_fast.train.control``): one dataclass, read from
YAML/JSON and overridden by flags (``aihf_fast.train.options``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..options import ConfigError

METHODS = ("expert", "bc", "irl", "rlhf", "aihf")
NEEDS_DEMOS = ("bc", "irl", "aihf")
NEEDS_PREFS = ("rlhf",)
TERMINATIONS = ("env", "absorbing", "horizon")
# gymnasium MuJoCo tasks whose episodes end only at the time limit
_NEVER_TERMINATE = ("HalfCheetah", "Swimmer", "Reacher", "Pusher", "HumanoidStandup")


def fixed_horizon_options(task: str) -> dict | None:
    """The env keywords that make ``task``'s episodes run to the time limit ({} if they already
    do), None when the task terminates without an option to turn it off (InvertedPendulum)."""
    import inspect

    import gymnasium
    from gymnasium.envs.registration import load_env_creator

    spec = gymnasium.spec(task)
    if "terminate_when_unhealthy" in inspect.signature(load_env_creator(spec.entry_point)).parameters:
        return {"terminate_when_unhealthy": False}
    return {} if spec.name in _NEVER_TERMINATE else None


@dataclass
class ControlConfig:
    task: str = field(default="InvertedPendulum-v5", metadata={"help": "gymnasium MuJoCo id (aihf_fast.envs.task_ids())"})
    method: str = field(default="aihf", metadata={"help": "|".join(METHODS) + " (expert: PPO on the true reward)"})
    seed: int = field(default=0, metadata={"help": "seed of the networks, environments and data draws"})
    output_dir: str = field(default="runs/control", metadata={"help": "where log.jsonl, checkpoints, summary.json and curves.png go"})
    demonstrations: str | None = field(default=None, metadata={"help": "demonstrations .npz (Trajectories)"})
    preferences: str | None = field(default=None, metadata={"help": "segment preferences .npz (SegmentPairs)"})
    num_pairs: int | None = field(default=None, metadata={"help": "use the first N preference pairs (default: all)"})
    env_steps: int = field(default=100_000, metadata={"help": "environment steps of RL in all"})
    # PPO (the RL solver of every method)
    num_envs: int = field(default=16, metadata={"help": "parallel environments of the PPO rollouts"})
    sim_threads: int | None = field(default=None, metadata={
        "help": "C++ threads stepping the envs (default: min(num_envs, CPUs)); 1 when many runs share the CPUs"})
    learn_threads: int | None = field(default=1, metadata={
        "help": "torch threads of the learner (PPO, reward model); its networks are small, so 1 avoids the "
                "threading overhead (unset: torch's default)"})
    rollout_steps: int = field(default=128, metadata={"help": "PPO steps per env per iteration"})
    ppo_epochs: int = field(default=10, metadata={"help": "PPO epochs over each rollout batch"})
    minibatch_size: int = field(default=256, metadata={"help": "PPO minibatch size (state-actions)"})
    ppo_lr: float = field(default=3e-4, metadata={"help": "PPO Adam learning rate"})
    gamma: float = field(default=0.99, metadata={"help": "discount factor"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    ent_coef: float = field(default=0.0, metadata={"help": "PPO entropy bonus coefficient"})
    hidden: int = field(default=64, metadata={"help": "width of the actor/critic's 2 hidden layers"})
    log_std_init: float = field(default=-0.5, metadata={"help": "initial log std of the Gaussian policy"})
    # reward model and reward step
    w_D: float = field(default=1.0, metadata={"help": "aihf: weight of demonstrations vs policy samples"})
    w_P: float = field(default=1.0, metadata={"help": "aihf: weight of the segment preferences"})
    reward_hidden: int = field(default=64, metadata={"help": "width of the reward MLP's 2 hidden layers"})
    reward_lr: float = field(default=3e-4, metadata={"help": "reward-model Adam learning rate"})
    reward_lr_P: float | None = field(default=None, metadata={"help": "aihf: step size of the preference term; given, each reward step takes two Adam updates with their own moments: the demonstration term at reward_lr, then the pairs at reward_lr_P"})
    reward_replay: int = field(default=0, metadata={"help": "irl/aihf: policy state-actions of earlier iterations kept (the newest N); each reward step adds reward_batch of them to the current rollout's samples"})
    reward_steps: int = field(default=5, metadata={"help": "irl/aihf: reward steps per PPO iteration"})
    reward_batch: int = field(default=256, metadata={"help": "state-actions per term per reward step"})
    pair_batch: int = field(default=64, metadata={"help": "preference pairs per reward step"})
    reward_l2: float = field(default=1e-3, metadata={"help": "l2 penalty on reward values: l2 * mean r^2 of the demonstration/sample state-actions, plus l2 * mean r^2 of the preference segments' state-actions"})
    reward_clip: float = field(default=10.0, metadata={"help": "reward model output clipped to [-clip, clip]"})
    reward_next_obs: bool = field(default=False, metadata={"help": "r(s, a, s') instead of r(s, a)"})
    rl_reward: str = field(default="sigmoid", metadata={"help": "what PPO maximises of r_theta: sigmoid (positive, so "
                           "that ending an episode early never pays; the usual fix for IRL's termination bias) | raw"})
    termination: str = field(default="env", metadata={
        "help": "what the end of an episode is worth in training: env (the task's terminations, nothing after) | "
                "absorbing (irl/aihf: a termination leads to an absorbing state whose reward the reward step "
                "learns, DAC) | horizon (train with terminate_when_unhealthy=False: every episode runs to the "
                "time limit; evaluation keeps the task's terminations)"})
    rlhf_reward_steps: int = field(default=2000, metadata={"help": "rlhf: reward-model steps before RL"})
    heldout_pairs: int = field(default=0, metadata={
        "help": "the last N pairs of the preferences file, never trained on and outside every num_pairs budget "
                "(the same set for every budget): their likelihood and accuracy under r_theta are logged at each "
                "evaluation, and rlhf's reward fit stops early on them (0: none)"})
    heldout_demos: int = field(default=0, metadata={
        "help": "the last N episodes of the demonstrations file, never trained on: each evaluation logs the "
                "policy's negative log-likelihood of their actions (eval/heldout_demo_nll), bc's a validation "
                "signal (0: none)"})
    rlhf_patience: int = field(default=5, metadata={
        "help": "rlhf with heldout_pairs: stop the reward fit after this many checks (at step 0, every 50 steps, "
                "the last) without a better held-out pair likelihood, keeping the best parameters"})
    bc_steps: int = field(default=2000, metadata={"help": "bc, and bc_init: behaviour-cloning steps"})
    bc_init: bool = field(default=False, metadata={"help": "rlhf/irl/aihf: start the actor from BC on the demonstrations"})
    # evaluation, logging, checkpoints
    eval_every: int = field(default=5, metadata={"help": "PPO iterations between evaluations"})
    eval_episodes: int = field(default=10, metadata={"help": "episodes per evaluation"})
    save_every: int = field(default=10, metadata={"help": "PPO iterations between checkpoints (expert: policy snapshots)"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in output_dir"})
    overwrite: bool = field(default=False, metadata={"help": "start over even if output_dir holds a checkpoint (deletes it)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @property
    def uses_reward_model(self) -> bool:
        return self.method in ("irl", "rlhf", "aihf")


def validate(cfg: ControlConfig) -> None:
    """Fail early, naming the option."""
    from ...envs import task_ids

    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.task not in task_ids():
        raise ConfigError(f"task: unknown {cfg.task!r}; supported: {sorted(task_ids())}")
    for name in ("w_D", "w_P", "reward_l2", "ent_coef", "rlhf_reward_steps", "bc_steps", "env_steps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    needs_d = cfg.method in NEEDS_DEMOS or cfg.bc_init
    needs_p = cfg.method in NEEDS_PREFS or (cfg.method == "aihf" and cfg.w_P > 0)
    if cfg.method == "aihf" and cfg.w_D == 0:
        needs_d = cfg.bc_init
    for name, need in (("demonstrations", needs_d), ("preferences", needs_p)):
        path = getattr(cfg, name)
        if need and not path:
            raise ConfigError(f"method {cfg.method!r} needs {name} (a .npz file)")
        if path and not os.path.isfile(path):
            raise ConfigError(f"{name}: file not found: {path!r}")
    if cfg.method == "aihf" and cfg.w_D == 0 and cfg.w_P == 0:
        raise ConfigError("aihf needs w_D > 0 or w_P > 0")
    for name in ("num_envs", "rollout_steps", "ppo_epochs", "minibatch_size", "hidden", "reward_hidden",
                 "reward_steps", "reward_batch", "pair_batch", "eval_every", "eval_episodes", "save_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("ppo_lr", "reward_lr", "reward_clip"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.reward_lr_P is not None:
        if cfg.method != "aihf":
            raise ConfigError(f"reward_lr_P is an option of method 'aihf', not {cfg.method!r}")
        if not cfg.reward_lr_P > 0:
            raise ConfigError(f"reward_lr_P must be > 0, got {cfg.reward_lr_P}")
        if cfg.w_D == 0 or cfg.w_P == 0:
            raise ConfigError("reward_lr_P gives the preference term a step size of its own: it needs both terms "
                              f"(w_D > 0 and w_P > 0), got w_D={cfg.w_D}, w_P={cfg.w_P}")
    if cfg.heldout_pairs < 0:
        raise ConfigError(f"heldout_pairs must be >= 0, got {cfg.heldout_pairs}")
    if cfg.heldout_demos < 0:
        raise ConfigError(f"heldout_demos must be >= 0, got {cfg.heldout_demos}")
    if cfg.heldout_demos and not cfg.demonstrations:
        raise ConfigError("heldout_demos holds out episodes of the demonstrations: give demonstrations")
    if cfg.rlhf_patience < 1:
        raise ConfigError(f"rlhf_patience must be >= 1, got {cfg.rlhf_patience}")
    if cfg.reward_replay < 0:
        raise ConfigError(f"reward_replay must be >= 0, got {cfg.reward_replay}")
    if cfg.reward_replay and not (cfg.method == "irl" or (cfg.method == "aihf" and cfg.w_D > 0)):
        raise ConfigError("reward_replay keeps policy samples for the demonstration term: methods irl and aihf "
                          "(w_D > 0) only")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.gae_lambda <= 1):
        raise ConfigError(f"gamma and gae_lambda must be in [0, 1], got {cfg.gamma}, {cfg.gae_lambda}")
    if cfg.rl_reward not in ("sigmoid", "raw"):
        raise ConfigError(f"rl_reward must be 'sigmoid' or 'raw', got {cfg.rl_reward!r}")
    if cfg.termination not in TERMINATIONS:
        raise ConfigError(f"termination must be one of {TERMINATIONS}, got {cfg.termination!r}")
    if cfg.termination == "absorbing":
        if not (cfg.method == "irl" or (cfg.method == "aihf" and cfg.w_D > 0)):
            raise ConfigError("termination='absorbing' learns the absorbing state's reward in the demonstration "
                              f"term: methods irl and aihf (w_D > 0) only, got method {cfg.method!r}")
        if fixed_horizon_options(cfg.task) == {}:
            raise ConfigError(f"termination='absorbing': {cfg.task} never ends an episode before the time limit, so "
                              "there is no absorbing state to learn; use termination='env'")
        if cfg.reward_replay:
            raise ConfigError("termination='absorbing' does not combine with reward_replay (the replayed samples "
                              "carry no absorbing-state share); set reward_replay=0")
    if cfg.termination == "horizon":
        if cfg.method == "bc":
            raise ConfigError("termination='horizon' changes the RL environments: method 'bc' has none")
        if fixed_horizon_options(cfg.task) is None:
            raise ConfigError(f"termination='horizon': {cfg.task} ends episodes without a "
                              "terminate_when_unhealthy option to turn off")
    if cfg.learn_threads is not None and cfg.learn_threads < 1:
        raise ConfigError(f"learn_threads must be >= 1 or unset, got {cfg.learn_threads}")
    if cfg.sim_threads is not None and cfg.sim_threads < 1:
        raise ConfigError(f"sim_threads must be >= 1 or unset, got {cfg.sim_threads}")
    if cfg.num_pairs is not None and cfg.num_pairs < 0:
        raise ConfigError(f"num_pairs must be >= 0, got {cfg.num_pairs}")
