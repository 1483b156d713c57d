"""`controller.yaml`: the controller's configuration schema (validated at start-up).

Every key is documented here and in deploy/controller.yaml; unknown keys and wrong types
are errors naming the key and the file (vmad/config.py does the loading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vmad.config import StrictModel
from vmad.controller.fleet_page import FleetSettings
from vmad.controller.policy import RuleSettings
from vmad.controller.reward import RewardSettings
from vmad.http_endpoint import MetricsSettings
from vmad.security import SecurityConfig

__all__ = ["ControllerConfig", "DQNConfig", "PolicyConfig", "RewardConfig", "RulesConfig"]


class RulesConfig(StrictModel):
    """The rule policy's thresholds; controller/policy.py's RuleSettings explains each."""

    min_labelled: int = Field(32, ge=0)
    min_f1: float = Field(0.6, ge=0, le=1)
    min_accuracy: float = Field(0.9, ge=0, le=1)
    finetune_batches: int = Field(100, ge=1, le=10_000)
    max_batches_per_model: int = Field(600, ge=1)
    reset_drift: float = Field(3.0, ge=0)
    cooldown_s: float = Field(30.0, ge=0)

    def settings(self) -> RuleSettings:
        return RuleSettings(**self.model_dump())


class DQNConfig(StrictModel):
    """The learning policy (controller/dqn.py's DQNPolicy explains each key)."""

    initial: Path | None = Field(
        None, description="Q-network weights (.npz) to start from when `state` does not "
                          "exist yet; empty = the default policy shipped with vmad")
    state: Path | None = Field(
        None, description="where this controller keeps its own learned weights (.npz); "
                          "empty = policy.npz beside the registry database")
    learn: bool = Field(True, description="keep learning from the fleet's transitions")
    learning_starts: int = Field(200, ge=1, description="transitions stored before learning")
    buffer_size: int = Field(50_000, ge=1, description="replay buffer capacity (transitions)")
    batch_size: int = Field(64, ge=1, description="transitions per gradient step")
    learning_rate: float = Field(1e-4, gt=0, description="Adam step size")
    train_every: int = Field(4, ge=1, description="new transitions between gradient steps")
    target_update: int = Field(500, ge=1,
                               description="gradient steps between target-network syncs")
    save_every: int = Field(50, ge=1, description="gradient steps between saves")
    epsilon: float = Field(0.0, ge=0, le=1,
                           description="share of decisions explored at random (off: 0)")
    seed: int = Field(0, description="exploration and batch sampling")


class PolicyConfig(StrictModel):
    kind: Literal["rules", "dqn"] = Field("rules",
                                          description="which policy answers state reports")
    rules: RulesConfig = RulesConfig()
    dqn: DQNConfig = DQNConfig()


class RewardConfig(StrictModel):
    """R = a1*R1 + a2*R2 + a3*R3 and its discount; controller/reward.py defines the terms."""

    a1: float = Field(0.4, ge=0, le=1, description="weight of R1 (accuracy or F1)")
    a2: float = Field(0.3, ge=0, le=1, description="weight of R2 (exp(-loss))")
    a3: float = Field(0.3, ge=0, le=1, description="weight of R3 (1 - action cost)")
    r1: Literal["accuracy", "f1"] = Field("f1", description="what R1 measures")
    gamma: float = Field(0.9, ge=0, lt=1, description="discount of future rewards")
    batch_budget: int = Field(200, ge=1, description="fine-tuning batches that cost all of R3")
    push_cost: float = Field(0.1, ge=0, le=1, description="cost of sending a new bundle")

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> RewardConfig:
        total = self.a1 + self.a2 + self.a3
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"a1 + a2 + a3 must be 1 (R stays in [0, 1]); got {total:g}")
        return self

    def settings(self) -> RewardSettings:
        return RewardSettings(a1=self.a1, a2=self.a2, a3=self.a3, r1=self.r1,
                              batch_budget=self.batch_budget, push_cost=self.push_cost)


class ControllerConfig(StrictModel):
    listen: str = Field("127.0.0.1:50071", description="host:port trainers connect to")
    database: Path = Field(..., description="SQLite registry file (created if missing)")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    policy: PolicyConfig = PolicyConfig()
    reward: RewardConfig = RewardConfig()
    # mTLS and the trainers' accepted tokens (`tokens: {trainer_id: token}`).
    security: SecurityConfig = SecurityConfig()
    # Plaintext /metrics, /healthz, /readyz (docs/operations.md); null = off.
    metrics: MetricsSettings = MetricsSettings(listen="0.0.0.0:50072")
    # The read-only fleet page (HTML + JSON; controller/fleet_page.py); loopback.
    fleet: FleetSettings = FleetSettings()
