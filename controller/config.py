"""`controller.yaml`: the controller's configuration schema (validated at start-up).

Every key is documented here and in deploy/controller.yaml; unknown keys and wrong types
are errors naming the key and the file (vmad/config.py does the loading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from controller.policy import RuleSettings
from vmad.security import SecurityConfig

__all__ = ["ControllerConfig", "PolicyConfig", "RewardConfig", "RulesConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RulesConfig(_Strict):
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


class PolicyConfig(_Strict):
    kind: Literal["rules"] = Field("rules", description="which policy answers state reports")
    rules: RulesConfig = RulesConfig()


class RewardConfig(_Strict):
    """Terms of controller/reward.py."""

    batch_budget: int = Field(200, ge=1, description="fine-tuning batches that cost all of R3")
    push_cost: float = Field(0.1, ge=0, le=1, description="cost of sending a new bundle")


class ControllerConfig(_Strict):
    listen: str = Field("127.0.0.1:50071", description="host:port trainers connect to")
    database: Path = Field(..., description="SQLite registry file (created if missing)")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    policy: PolicyConfig = PolicyConfig()
    reward: RewardConfig = RewardConfig()
    # mTLS and the trainers' accepted tokens (`tokens: {trainer_id: token}`).
    security: SecurityConfig = SecurityConfig()
