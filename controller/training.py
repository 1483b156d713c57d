"""Offline training of the DQN policy in the control environment
(`vmad controller train-policy`).

stable-baselines3's DQN learns in `VMLifeEnv` episodes of the "train" split. Output
folder:
- `policy.npz`: the Q-network in the non-pickle policy format (controller/dqn.py), what
  the controller loads; copy it to controller/default_policy/ to ship it;
- `checkpoints/dqn_<steps>_steps.zip`: stable-baselines3 checkpoints every
  `checkpoint_every` steps, to resume or inspect on this machine (they unpickle: never
  load one you did not write);
- `steps.csv`: one row per environment step (episode, step, action, reward, accuracy,
  F1, loss, batches, training seconds), the F1 log behind the reward's R1 choice.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmad.controller.env import EnvSettings, VMLifeEnv
from vmad.controller.reward import DEFAULT_GAMMA

__all__ = ["TrainSettings", "train_policy"]


@dataclass(frozen=True)
class TrainSettings:
    """DQN hyper-parameters for offline training (stable-baselines3 names).

    steps: environment steps (decisions) in all. learning_starts: random steps first.
    exploration_fraction / exploration_final_eps: epsilon falls linearly from 1 to the
        final value over this share of the steps, then stays.
    net_arch: hidden layer widths of the Q-network.
    """

    steps: int = 10_000
    learning_rate: float = 1e-3
    buffer_size: int = 50_000
    learning_starts: int = 500
    batch_size: int = 64
    gamma: float = DEFAULT_GAMMA
    train_freq: int = 1
    target_update_interval: int = 250
    exploration_fraction: float = 0.4
    exploration_final_eps: float = 0.05
    net_arch: tuple[int, ...] = (64, 64)
    checkpoint_every: int = 2_000
    seed: int = 0
    env: EnvSettings = field(default_factory=EnvSettings)


def _callbacks(out: Path, settings: TrainSettings, progress: bool) -> list[Any]:
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback

    class StepLog(BaseCallback):
        """Writes every step's info to steps.csv and drives a rich progress bar."""

        def __init__(self) -> None:
            super().__init__()
            self.episode = 0
            self.step_in_episode = 0
            self.handle = open(out / "steps.csv", "w", newline="")  # noqa: SIM115
            self.writer = csv.writer(self.handle)
            self.writer.writerow(["episode", "step", "action", "reward", "accuracy", "f1",
                                  "loss", "batches", "train_seconds", "epsilon"])
            self.recent_f1: list[float] = []
            self.progress: Any = None

        def _on_training_start(self) -> None:
            if progress:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(
                    "[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), "F1 {task.fields[f1]:.3f} eps {task.fields[eps]:.2f}",
                    TimeElapsedColumn(), TimeRemainingColumn())
                self.progress.start()
                self.task = self.progress.add_task("train-policy", total=settings.steps,
                                                   f1=float("nan"), eps=1.0)

        def _on_step(self) -> bool:
            info = self.locals["infos"][0]
            self.step_in_episode += 1
            reward = float(self.locals["rewards"][0])
            # The schedule's value now: the model updates `exploration_rate` only after
            # the callbacks of a step have run.
            epsilon = float(self.model.exploration_schedule(
                self.model._current_progress_remaining))
            self.writer.writerow([self.episode, self.step_in_episode, info["action"],
                                  f"{reward:.5f}", f"{info['accuracy']:.5f}",
                                  f"{info['f1']:.5f}", f"{info['loss']:.5f}", info["batches"],
                                  f"{info['train_seconds']:.4f}", f"{epsilon:.3f}"])
            self.recent_f1 = [*self.recent_f1, info["f1"]][-500:]
            if self.locals["dones"][0]:
                self.episode += 1
                self.step_in_episode = 0
                self.handle.flush()
            if self.progress is not None:
                self.progress.update(self.task, advance=1, eps=epsilon,
                                     f1=sum(self.recent_f1) / len(self.recent_f1))
            return True

        def _on_training_end(self) -> None:
            if self.progress is not None:
                self.progress.stop()
            self.handle.close()

    checkpoints = CheckpointCallback(settings.checkpoint_every, str(out / "checkpoints"),
                                     name_prefix="dqn")
    return [StepLog(), checkpoints]


def train_policy(out: Path, settings: TrainSettings, *, progress: bool = True) -> Path:
    """Train a DQN for `settings.steps` decisions; returns the written policy.npz."""
    from stable_baselines3 import DQN
    from stable_baselines3.common.monitor import Monitor

    from vmad.controller.dqn import policy_file_of, save_policy_file

    out.mkdir(parents=True, exist_ok=True)
    env = Monitor(VMLifeEnv(settings.env, split="train"))
    model = DQN("MlpPolicy", env, learning_rate=settings.learning_rate,
                buffer_size=settings.buffer_size, learning_starts=settings.learning_starts,
                batch_size=settings.batch_size, gamma=settings.gamma,
                train_freq=settings.train_freq,
                target_update_interval=settings.target_update_interval,
                exploration_fraction=settings.exploration_fraction,
                exploration_final_eps=settings.exploration_final_eps,
                policy_kwargs={"net_arch": list(settings.net_arch)}, seed=settings.seed,
                device="cpu", verbose=0)
    started = time.perf_counter()
    try:
        model.learn(total_timesteps=settings.steps, callback=_callbacks(out, settings, progress))
    finally:
        env.close()
    env_settings = asdict(settings.env)
    env_settings["smd_dir"] = str(settings.env.smd_dir or "")
    env_settings["reward"] = settings.env.reward.model_dump()
    meta = {"trained": f"vmad controller train-policy: {settings.steps} steps, seed "
                       f"{settings.seed}, {time.perf_counter() - started:.0f} s",
            "train_settings": {k: v for k, v in asdict(settings).items() if k != "env"},
            "env_settings": env_settings}
    return save_policy_file(out / "policy.npz", policy_file_of(model, meta))
