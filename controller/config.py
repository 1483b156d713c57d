"""`controller.yaml`: the controller's configuration schema (validated at start-up).

Each section is declared once, as a pydantic model beside the code that uses it, and
used as is: `policy.rules` (controller/policy.py), `policy.dqn` (controller/dqn.py),
`policy.shadow` (controller/shadow.py), `reward` (controller/reward.py), `budget`
(controller/budget.py). Every key is documented there and in deploy/controller.yaml;
unknown keys and wrong types are errors naming the key and the file (vmad/config.py
does the loading). Importing this module imports no PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from vmad.config import StrictModel
from vmad.controller.budget import BudgetSettings
from vmad.controller.dqn import DQNSettings
from vmad.controller.fleet_page import FleetSettings
from vmad.controller.policy import RuleSettings
from vmad.controller.reward import RewardSettings
from vmad.controller.shadow import ShadowSettings
from vmad.http_endpoint import MetricsSettings
from vmad.security import SecurityConfig

__all__ = ["ControllerConfig", "PolicyConfig"]


class PolicyConfig(StrictModel):
    kind: Literal["rules", "dqn", "shadow"] = Field(
        "rules", description="who answers state reports: the rules, the DQN, or the rules "
                             "with the DQN in shadow until a backtest lets it take over")
    rules: RuleSettings = RuleSettings()
    dqn: DQNSettings = DQNSettings()
    shadow: ShadowSettings = ShadowSettings()


class ControllerConfig(StrictModel):
    listen: str = Field("127.0.0.1:50071", description="host:port trainers connect to")
    database: Path = Field(..., description="SQLite registry file (created if missing)")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    policy: PolicyConfig = PolicyConfig()
    reward: RewardSettings = RewardSettings()
    budget: BudgetSettings = BudgetSettings()
    # mTLS and the trainers' accepted tokens (`tokens: {trainer_id: token}`).
    security: SecurityConfig = SecurityConfig()
    # Plaintext /metrics, /healthz, /readyz (docs/operations.md); null = off.
    metrics: MetricsSettings = MetricsSettings(listen="0.0.0.0:50072")
    # The read-only fleet page (HTML + JSON; controller/fleet_page.py); loopback.
    fleet: FleetSettings = FleetSettings()
