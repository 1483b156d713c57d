"""`trainer.yaml`: the trainer's configuration schema (validated at start-up).

Every key is documented here and in deploy/trainer.yaml; unknown keys and wrong types
are errors naming the key and the file (vmad/config.py does the loading, `${ENV}`
substitution included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from vmad.bundle import MAX_ALARM_AFTER
from vmad.config import StrictModel
from vmad.http_endpoint import MetricsSettings
from vmad.security import SecurityConfig
from vmad.trainer.residual import SUBSPACE_VARIANCE
from vmad.trainer.states import NORMAL_STATES

__all__ = ["AdaptationSettings", "ControllerLink", "ModelSettings", "ServingSettings",
           "StoreSettings",
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
    """How the trainer adapts each VM's model (`training` in trainer.yaml); trainer/transfer.py
    uses this model directly.

    assume_normal_unlabelled: count windows nobody labelled as normal. Real agents only
    ship labels for injected faults and operator marks; with this on, everything else is
    taken as normal, which is what an operator who marks every incident means.
    """

    lr: float = Field(3e-4, gt=0, description="fine-tuning learning rate")
    batch_size: int = Field(64, ge=1, description="windows per mini-batch")
    freeze_early: bool = Field(False, description="train only the classifier layers")
    max_windows: int = Field(4_000, ge=1, description="newest labelled windows used per VM")
    state_samples: int = Field(2_000, ge=2, description="samples summarized per state report")
    refit_normalization: bool = Field(True, description="refit statistics on the VM's data")
    assume_normal_unlabelled: bool = Field(
        False, description="treat windows nobody labelled as normal")
    self_supervised: bool = Field(
        False, description="an adapted VM fine-tunes on its own normal history with synthetic "
                           "faults injected as positives (no label needed); its real labels "
                           "join, drawn more often. false: real labels only (measured better "
                           "on unseen VMs, docs/detection.md)")
    threads: int = Field(1, ge=1, description="PyTorch threads (the node also runs VMs)")
    seed: int = Field(0, description="makes fine-tuning repeatable")


class AdaptationSettings(StrictModel):
    """Label-free adaptation of each VM's detector (trainer/adaptation.py): its own
    statistics, its own per-metric score fused with the network's, its own threshold.

    A VM runs the pooled warm-up bundle (no alarms) until `warmup_samples` of its own
    samples have arrived; the trainer then fits on them and pushes the VM's bundle
    without waiting for any label. Every `refresh_samples` further samples (an hour) it
    refits on the newest `history_samples` that no verdict flagged (unless a label marked
    them normal) and no label marked anomalous, so the VM's normal may drift (a daily
    traffic curve that its first hour did not show) without alarms while a fault is not
    learnt as normal. A verdict is anomalous once `alarm_after` windows in a row reach
    the threshold.
    """

    warmup_samples: int = Field(
        720, ge=80, description="own samples before the first per-VM bundle (720 = 1 h at 5 s)")
    refresh_samples: int = Field(
        720, ge=1, description="refit after this many more samples (720 = 1 h at 5 s)")
    history_samples: int = Field(
        4_320, ge=80, description="newest samples a fit uses (4,320 = 6 h at 5 s)")
    label_refit_interval_s: float = Field(
        60.0, ge=0, le=86_400,
        description="a label of normal refits an adapted VM at once, but at most once per "
                    "this many seconds per VM; labels within it wait for one refit")
    alarm_after: int = Field(
        3, ge=1, le=MAX_ALARM_AFTER, description="windows in a row at the threshold before "
                                                 "a verdict is anomalous (as Prometheus' "
                                                 "`for:`)")
    target_false_alarm_rate: float = Field(
        0.005, gt=0, lt=0.5, description="threshold flags this share of the VM's own windows")
    min_deviation: float = Field(
        6.0, ge=0, description="no alarm below this many spreads of the most deviant "
                               "metric while the network is at its usual level")
    cnn_weight: float = Field(
        0.5, ge=0, le=1, description="weight of the network in the fused score (the rest "
                                     "goes to the per-metric deviation) when cnn_weights "
                                     "is empty or the history too short to inject faults")
    cnn_weights: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0], max_length=21,
        description="per VM, the network's weight is the one of these whose fused score "
                    "best ranks faults injected into the VM's own history (ties: the "
                    "lower); [] = always cnn_weight")
    network_floor: bool = Field(
        True, description="no alarm from the network part below the network's own "
                          "calibrated threshold while the deviation is at its usual level")
    components: int = Field(
        0, ge=0, description="principal components removed before the per-metric score "
                             "(0 = plain per-metric deviation)")
    subspace_variance: float = Field(
        SUBSPACE_VARIANCE, ge=0, le=1,
        description="the unsupervised part of the score also averages in the distance "
                    "from the principal subspace explaining this share of the VM's "
                    "variance (many metrics a little off together; on 16 metrics or "
                    "more); 0 = no such part")
    normal_states: int = Field(
        NORMAL_STATES, ge=0, le=256,
        description="the unsupervised part also averages in the largest per-metric "
                    "distance from the nearest of this many usual states of the VM "
                    "(k-means of its history: a VM busy by turns is normal in each "
                    "state; on 16 metrics or more); 0 = no such part")
    scale_floors: list[float] | None = Field(
        None, description="least normalization scale per metric of the network, in its "
                          "units; null = vmad.schema.DEFAULT_SCALE_FLOORS for the default "
                          "metrics, else 0")
    own_metric_floors: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        {}, max_length=256,
        description="least normalization scale of the metrics a VM reports after the "
                    "network's, in their units, by name or shell pattern (`app.*`); the "
                    "first pattern that matches wins; a metric none matches has none (its "
                    "scale falls back to its standard deviation, then 1)")


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
    adaptation: AdaptationSettings = AdaptationSettings()
    # mTLS, this trainer's token towards the controller, the agents' accepted tokens.
    security: SecurityConfig = SecurityConfig()
    # Plaintext /metrics, /healthz, /readyz (docs/operations.md); null = off.
    metrics: MetricsSettings = MetricsSettings(listen="0.0.0.0:50062")
