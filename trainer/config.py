"""`trainer.yaml`: the trainer's configuration schema (validated at start-up).

Every key is documented here and in deploy/trainer.yaml; unknown keys and wrong types
are errors naming the key and the file (vmad/config.py does the loading, `${ENV}`
substitution included).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from vmad.config import StrictModel
from vmad.http_endpoint import MetricsSettings
from vmad.security import SecurityConfig

if TYPE_CHECKING:  # transfer.py needs torch; validating a trainer.yaml must not
    from vmad.trainer.transfer import TransferSettings

__all__ = ["ControllerLink", "ModelSettings", "ServingSettings", "StoreSettings",
           "TrainerConfig", "TrainingSettings"]


class ControllerLink(StrictModel):
    """Where the trainer reports VM states. `address: null` runs the trainer alone
    (it serves agents and stores data, and nobody tells it to train)."""

    address: str | None = Field(None, description="controller host:port")
    report_interval_s: float = Field(10.0, gt=0, description="seconds between state reports")
    timeout_s: float = Field(5.0, gt=0, description="deadline of each report call")


class ModelSettings(StrictModel):
    pretrained: Path | None = Field(
        None, description="pretrained checkpoint folder; null = the one shipped in the package")


class StoreSettings(StrictModel):
    """Bounds per VM; the oldest entries go first (trainer/store.py)."""

    max_samples_per_vm: int = Field(20_000, ge=16, description="samples kept per VM")
    max_verdicts_per_vm: int = Field(20_000, ge=1, description="agent verdicts kept per VM")
    max_labels_per_vm: int = Field(1_000, ge=1, description="label intervals kept per VM")


class ServingSettings(StrictModel):
    """How many agents this trainer holds and how long it waits on each (every open call
    is a coroutine on one event loop, not a thread)."""

    max_agents: int = Field(
        5_000, ge=1, description="open telemetry streams (and as many bundle watches) at "
        "most; the next agent is refused with RESOURCE_EXHAUSTED, logged and counted")
    stream_idle_s: float = Field(
        300.0, gt=0, description="a telemetry stream that sends nothing for this long is "
        "closed with DEADLINE_EXCEEDED (the agent reconnects); frees a dead agent's slot")


class TrainingSettings(StrictModel):
    lr: float = Field(3e-4, gt=0, description="fine-tuning learning rate")
    batch_size: int = Field(64, ge=1, description="windows per mini-batch")
    freeze_early: bool = Field(False, description="train only the classifier layers")
    max_windows: int = Field(4_000, ge=1, description="newest labelled windows used per VM")
    state_samples: int = Field(2_000, ge=2, description="samples summarized per state report")
    refit_normalization: bool = Field(True, description="refit statistics on the VM's data")
    assume_normal_unlabelled: bool = Field(
        False, description="treat windows nobody labelled as normal")
    threads: int = Field(1, ge=1, description="PyTorch threads (the node also runs VMs)")
    seed: int = Field(0, description="makes fine-tuning repeatable")

    def transfer(self) -> TransferSettings:
        from vmad.trainer.transfer import TransferSettings

        return TransferSettings(
            lr=self.lr, batch_size=self.batch_size, freeze_early=self.freeze_early,
            max_windows=self.max_windows, state_samples=self.state_samples,
            refit_normalization=self.refit_normalization,
            assume_normal_unlabelled=self.assume_normal_unlabelled)


class TrainerConfig(StrictModel):
    trainer_id: str = Field(..., min_length=1, description="this trainer's name in the registry")
    listen: str = Field("127.0.0.1:50061", description="host:port agents connect to (port 0: any)")
    data_dir: Path = Field(..., description="store, per-VM models (created if missing)")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    controller: ControllerLink = ControllerLink()
    model: ModelSettings = ModelSettings()
    store: StoreSettings = StoreSettings()
    serving: ServingSettings = ServingSettings()
    training: TrainingSettings = TrainingSettings()
    # mTLS, this trainer's token towards the controller, the agents' accepted tokens.
    security: SecurityConfig = SecurityConfig()
    # Plaintext /metrics, /healthz, /readyz (docs/operations.md); null = off.
    metrics: MetricsSettings = MetricsSettings(listen="0.0.0.0:50062")
