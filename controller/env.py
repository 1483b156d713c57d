"""The control environment: one episode is one VM's life under a changing workload, with
the trainer's own code deciding what its detector knows.

The stream switches regime at random decision steps (about every `mean_regime_steps`):
a synthetic regime (vmad/synthetic.py) draws a new workload profile, load level, daily
rhythm and fault mix; an SMD regime (`../shared/datasets/smd`, when present) is a
stretch of a different real server. A detector fine-tuned on the old regime drifts.

Each step the environment, in the trainer's place:
1. carries out the action with the trainer's `VMModels` (trainer/transfer.py): the same
   reset and fine-tune code, normalizer refit and bookkeeping the production trainer
   runs, on a pretrained detector of `kind` (small and fast by default);
2. plays the agent for the next `step_samples` samples: scores every window ending in
   them with the VM's current model, and ingests samples, verdicts and labels into the
   trainer's `TelemetryStore` (labels arrive with the samples: an operator who marks
   every incident, as `assume_normal_unlabelled` means);
3. observes `VMModels.state(...).to_vector()`: exactly the vector the trainer reports
   in production (vmad/state.py), so a policy trained here reads live states as is.

The reward (controller/reward.py) scores the action by the windows that arrive after it,
judged by the model it left in place, so a fine-tune is never credited for the windows
it trained on. `info` carries the step's accuracy, F1, loss, confusion counts and the
compute spent, which `vmad bench control` adds up.

Labels: by default (`validation: "labels"`) the reward and the state's quality
features are measured against the windows' true labels, as the trainer's state report
does today. With `validation: "injected"` they come from controller/validation.py's
label-free set instead: synthetic faults injected into the VM's own recent samples,
plus the incidents the operator labelled (`label_share` of them), weighted up. The
verdicts `vmad bench control` scores are always judged against the true labels.

Splits: "train" and "eval" episodes draw their workloads from disjoint seed streams
(numpy SeedSequence spawn keys) and disjoint SMD machines, and the pretrained detector
from a third, so a policy is never evaluated on what it was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from vmad.actions import CONTROL_ACTIONS, Action, Decision
from vmad.controller.reward import RewardSettings, reward_terms
from vmad.evaluation import events
from vmad.schema import DEFAULT_METRICS
from vmad.state import FEATURES, quality_of

__all__ = ["SMD_DIR", "EnvSettings", "Stream", "VMLifeEnv", "make_stream",
           "pretrained_checkpoint", "smd_machines"]

SMD_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "smd"
_SPLITS = {"pretrain": 0, "train": 1, "eval": 2}
Split = Literal["train", "eval"]
_VM = "vm"
# Newest samples the state's label-free quality features are measured on.
_STATE_VALIDATION_SAMPLES = 1000


@dataclass(frozen=True)
class EnvSettings:
    """One environment's shape.

    kind / window: the detector the trainer fine-tunes (trainer/models.py); "mlp" with
        32-sample windows keeps a step near 0.1 s on one core, "zoom-cnn" is the paper's.
    steps: decisions per episode. step_samples: samples between two decisions (240 at
        5 s = the trainer reporting every 20 minutes). warmup_samples: history the VM has
        before the first decision.
    mean_regime_steps: mean steps between regime switches (geometric).
    max_windows: newest labelled windows the trainer fine-tunes on and judges with.
    batch_size / lr: fine-tuning mini-batches (trainer.yaml `training`).
    smd_share: share of episodes built from SMD servers when `smd_dir` holds them.
    pretrain_batches: mini-batches of the pretraining the episodes start from.
    reward: controller/reward.py's settings.
    validation: what R1, R2 and the state's quality features are measured on. "labels":
        the windows' true labels (an operator who marks every incident). "injected":
        the label-free validation set of controller/validation.py, synthetic faults
        injected into the VM's own recent samples plus the incidents the operator
        labelled, weighted up; the evaluation (`vmad bench control`) still scores
        verdicts against the true labels.
    label_share: in "injected" mode, the share of real incidents the operator labels
        (each incident independently); only those reach the trainer and the validation.
    """

    kind: str = "mlp"
    window: int = 32
    steps: int = 36
    step_samples: int = 240
    warmup_samples: int = 720
    mean_regime_steps: float = 12.0
    max_windows: int = 4000
    batch_size: int = 64
    lr: float = 3e-4
    smd_share: float = 0.3
    smd_dir: Path | None = SMD_DIR
    pretrain_batches: int = 600
    seed: int = 0
    reward: RewardSettings = field(default_factory=RewardSettings)
    validation: Literal["labels", "injected"] = "labels"
    label_share: float = 1.0


@dataclass(frozen=True)
class Stream:
    """One episode's samples: `values[N, M]` every `interval_s`, `labels[N]`, and the
    sample index where each regime starts (with its description)."""

    values: np.ndarray
    labels: np.ndarray
    interval_s: float
    regimes: tuple[tuple[int, str], ...]

    def timestamps(self, start: int, stop: int) -> np.ndarray:
        # Any fixed origin will do: the trainer only compares timestamps with each other.
        return 1_700_000_000.0 + np.arange(start, stop, dtype=np.float64) * self.interval_s


def _seeds(seed: int, split: str, count: int) -> list[int]:
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(_SPLITS[split],))
    return [int(s) for s in sequence.generate_state(count)]


def _regime_lengths(rng: np.random.Generator, settings: EnvSettings) -> list[int]:
    """Sample counts of consecutive regimes covering a whole episode."""
    total = settings.warmup_samples + settings.steps * settings.step_samples
    lengths, covered = [], 0
    while covered < total:
        steps = int(rng.geometric(1.0 / settings.mean_regime_steps))
        length = min(steps * settings.step_samples, total - covered)
        if not lengths:
            length = min(length + settings.warmup_samples, total)
        lengths.append(length)
        covered += length
    return lengths


def _synthetic_stream(rng: np.random.Generator, seed: int, settings: EnvSettings) -> Stream:
    from vmad.synthetic import FAULT_KINDS, PROFILES, generate_vm

    parts, labels, regimes, start = [], [], [], 0
    for i, length in enumerate(_regime_lengths(rng, settings)):
        profile = str(rng.choice(PROFILES))
        kinds = tuple(str(k) for k in rng.choice(sorted(FAULT_KINDS),
                                                 size=int(rng.integers(1, 4)), replace=False))
        rate = float(rng.uniform(0.04, 0.15))
        load = float(rng.uniform(0.6, 1.8))
        series, _ = generate_vm(seed * 101 + i, length, profile=profile, fault_kinds=kinds,
                                fault_rate=rate)
        values = series.values.copy()
        # A new load level: the same application serving more or fewer users. CPU and
        # memory are percentages of the VM, so they saturate.
        values[:, [0, 2, 3]] *= load
        values[:, 0] = np.minimum(values[:, 0], 100.0)
        parts.append(values)
        labels.append(series.labels)
        regimes.append((start, f"{profile} load x{load:.1f} faults {'+'.join(kinds)} "
                               f"rate {rate:.2f}"))
        start += length
    return Stream(np.concatenate(parts).astype(np.float32), np.concatenate(labels),
                  5.0, tuple(regimes))


def smd_machines(smd_dir: Path | None, split: Split) -> list[Path]:
    """SMD server folders of `split`: every fourth server (sorted by name) is held out
    for evaluation, the rest train."""
    if smd_dir is None or not smd_dir.is_dir():
        return []
    machines = sorted(p for p in smd_dir.iterdir() if (p / "test.csv.gz").is_file())
    return [m for i, m in enumerate(machines) if (i % 4 == 3) == (split == "eval")]


@functools.lru_cache(maxsize=16)
def _smd_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SMD server's labelled test part on the default metrics, in their units."""
    from vmad.replay import SMD_COLUMNS
    from vmad.series import read_series

    series = read_series(folder / "test.csv.gz")
    if series.labels is None:
        raise ValueError(f"{folder / 'test.csv.gz'} has no label column")
    columns = [SMD_COLUMNS[m][0] for m in DEFAULT_METRICS]
    scale = np.array([SMD_COLUMNS[m][1] for m in DEFAULT_METRICS], dtype=np.float32)
    return series.select(columns).values * scale, series.labels


def _smd_stream(rng: np.random.Generator, machines: list[Path],
                settings: EnvSettings) -> Stream:
    parts, labels, regimes, start = [], [], [], 0
    order = rng.permutation(len(machines))
    for i, length in enumerate(_regime_lengths(rng, settings)):
        machine = machines[int(order[i % len(order)])]
        values, marks = _smd_series(machine)
        offset = int(rng.integers(0, max(1, len(values) - length)))
        piece = values[offset:offset + length]
        if len(piece) < length:  # a short server file: repeat it rather than end early
            reps = -(-length // len(values))
            piece = np.tile(values, (reps, 1))[:length]
            marks = np.tile(marks, reps)
            offset = 0
        parts.append(piece)
        labels.append(marks[offset:offset + length])
        regimes.append((start, f"smd {machine.name} from sample {offset}"))
        start += length
    return Stream(np.concatenate(parts).astype(np.float32),
                  np.concatenate(labels).astype(np.int8), 60.0, tuple(regimes))


def make_stream(seed: int, split: Split, settings: EnvSettings) -> Stream:
    """The workload of episode `seed` of `split`: the same arguments, the same stream."""
    (regime_seed,) = _seeds(seed, split, 1)
    rng = np.random.default_rng(regime_seed)
    machines = smd_machines(settings.smd_dir, split)
    if machines and rng.random() < settings.smd_share:
        return _smd_stream(rng, machines, settings)
    return _synthetic_stream(rng, regime_seed % 2**31, settings)


@functools.lru_cache(maxsize=4)
def pretrained_checkpoint(kind: str, window: int, batches: int, seed: int) -> Any:
    """A detector of `kind` pretrained on synthetic VMs from the pretraining split (no
    episode of either split uses them), threshold picked on held-back windows."""
    from vmad.evaluation import best_f1_threshold
    from vmad.synthetic import generate_vm
    from vmad.trainer.checkpoint import Checkpoint
    from vmad.trainer.models import build_model
    from vmad.trainer.training import TrainConfig, predict_proba, train
    from vmad.windows import Normalizer, make_windows, window_labels

    series = [generate_vm(s, 6_000, fault_rate=0.08)[0] for s in _seeds(seed, "pretrain", 8)]
    normalizer = Normalizer.fit(np.concatenate([s.values for s in series]))
    windows = [make_windows(normalizer.apply(s.values), window) for s in series]
    labels = [window_labels(s.labels, window) for s in series]
    import torch

    torch.manual_seed(seed)  # the initial weights too: same seed, same detector
    model = build_model(kind, len(DEFAULT_METRICS), window)
    fit = np.concatenate(windows[:-2]), np.concatenate(labels[:-2])
    held = np.concatenate(windows[-2:]), np.concatenate(labels[-2:])
    train(model, *fit, TrainConfig(max_batches=batches, batch_size=64, seed=seed))
    threshold = best_f1_threshold(held[1], predict_proba(model, held[0]))
    return Checkpoint(model, kind, DEFAULT_METRICS, window, normalizer, threshold,
                      {"command": "controller env pretraining", "seed": seed})


def _anomalous_runs(labels: np.ndarray, timestamps: np.ndarray) -> list[tuple[float, float]]:
    return [(float(timestamps[a]), float(timestamps[b - 1])) for a, b in events(labels)]


class VMLifeEnv(gym.Env):
    """A VM's life as a gymnasium environment (see the module docstring).

    Observation: `VMState.to_vector()`, float32 of length 11 + 2*M (19 for the default
    four metrics). Actions: `Discrete(len(CONTROL_ACTIONS))` (vmad/actions.py).
    `reset(seed=s)` plays episode s of `split`; without a seed, episodes follow on from
    the environment's own seed.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, settings: EnvSettings | None = None, split: Split = "train") -> None:
        import torch

        super().__init__()
        self.settings = settings or EnvSettings()
        self.split = split
        # Training and scoring tiny models: one thread is fastest and leaves the other
        # cores to whatever else the node runs.
        torch.set_num_threads(1)
        n = len(FEATURES) + 2 * len(DEFAULT_METRICS)
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(n,), dtype=np.float32)
        self.action_space = spaces.Discrete(len(CONTROL_ACTIONS))
        self._pretrained = pretrained_checkpoint(self.settings.kind, self.settings.window,
                                                 self.settings.pretrain_batches,
                                                 self.settings.seed)
        self._workdir = Path(tempfile.mkdtemp(prefix="vmad-env-"))
        self._episode = -1
        self._next_seed = self.settings.seed * 1_000_003
        self._store: Any = None
        self.models: Any = None
        self.stream: Stream | None = None
        self._labels_for: Stream | None = None
        self._labels = np.zeros(0, dtype=np.int8)

    # -- gymnasium ---------------------------------------------------------------------

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        from vmad.trainer.config import TrainingSettings
        from vmad.trainer.store import TelemetryStore
        from vmad.trainer.transfer import VMModels

        super().reset(seed=seed)
        if seed is None:
            seed, self._next_seed = self._next_seed, self._next_seed + 1
        self._close_episode()
        self._episode += 1
        s = self.settings
        self.episode_seed = seed
        self.stream = make_stream(seed, self.split, s)
        self._store = TelemetryStore(":memory:")
        folder = self._workdir / f"episode-{self._episode}"
        self.models = VMModels(
            self._pretrained, self._store, folder,
            TrainingSettings(lr=s.lr, batch_size=s.batch_size, max_windows=s.max_windows,
                             state_samples=min(s.max_windows, 2000), assume_normal_unlabelled=True),
            seed=seed % 2**31)
        self._step_index = 0
        self._cursor = s.warmup_samples
        self._play(0, s.warmup_samples)
        return self._observe(), {"regimes": self.stream.regimes, "seed": seed}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.stream is None:
            raise RuntimeError("call reset() before step()")
        decision = CONTROL_ACTIONS[int(action)]
        batches, seconds = self._execute(decision)
        start, stop = self._cursor, self._cursor + self.settings.step_samples
        counts, quality = self._play(start, stop)
        self._cursor = stop
        self._step_index += 1
        accuracy, f1, loss = quality
        measured = quality
        if self.settings.validation == "injected":
            # The reward judges the model on the samples after the action with faults
            # injected, never on labels the fleet would not have.
            measured, _ = self._validation_quality(
                max(0, start - self.settings.window + 1), stop)
        terms = reward_terms(decision, accuracy=measured[0], f1=measured[1], loss=measured[2],
                             labelled=stop - start, settings=self.settings.reward)
        regime = sum(1 for first, _ in self.stream.regimes if first < stop) - 1
        info = {"action": decision.action.value, "batches": batches, "train_seconds": seconds,
                "accuracy": accuracy, "f1": f1, "loss": loss, "tp": counts[0],
                "fp": counts[1], "fn": counts[2], "tn": counts[3], "r1": terms.r1,
                "r2": terms.r2, "r3": terms.r3, "regime": regime}
        truncated = self._step_index >= self.settings.steps
        # The VM lives on after the episode: its end is a time limit, not a terminal state.
        return self._observe(), terms.total, False, truncated, info

    def close(self) -> None:
        self._close_episode()
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- the trainer's and the agent's parts -------------------------------------------

    def _observe(self) -> np.ndarray:
        """The trainer's state report now; kept as `last_state` for policies that read
        the state itself rather than its vector. In "injected" mode its quality
        features come from the label-free validation set over the newest samples."""
        assert self.stream is not None
        now = float(self.stream.timestamps(self._cursor - 1, self._cursor)[0])
        state = self.models.state(_VM, now=now)
        if self.settings.validation == "injected":
            start = max(0, self._cursor - _STATE_VALIDATION_SAMPLES)
            quality, windows = self._validation_quality(start, self._cursor)
            accuracy, f1, loss = quality
            state = dataclasses.replace(state, accuracy=accuracy, f1=f1, loss=loss,
                                        labelled_windows=windows)
        self.last_state = state
        return state.to_vector()

    def _operator_labels(self) -> np.ndarray:
        """The labels the operator gives this episode: every incident in "labels" mode,
        each with probability `label_share` in "injected" mode."""
        assert self.stream is not None
        if self._labels_for is not self.stream:
            labels = self.stream.labels.astype(np.int8)
            if self.settings.validation == "injected" and self.settings.label_share < 1:
                labels = labels.copy()
                rng = np.random.default_rng([self.episode_seed, 7])
                for a, b in events(labels):
                    if rng.random() >= self.settings.label_share:
                        labels[a:b] = 0
            self._labels_for, self._labels = self.stream, labels
        return self._labels

    def _validation_quality(self, start: int, stop: int
                            ) -> tuple[tuple[float, float, float], int]:
        """(accuracy, F1, loss) of the VM's current model on the label-free validation
        set built from samples [start, stop) (controller/validation.py), and how many
        windows it holds."""
        from vmad.controller.validation import injected_validation, validation_quality
        from vmad.trainer.training import predict_proba
        from vmad.windows import make_windows, window_labels

        assert self.stream is not None
        window = self.settings.window
        if stop - start < window:
            return (0.0, 0.0, 0.0), 0
        checkpoint = self.models.checkpoint(_VM)
        validation = injected_validation(
            self.stream.values[start:stop], self._operator_labels()[start:stop],
            self.stream.interval_s, seed=self.episode_seed * 100_003 + stop)
        windows = make_windows(checkpoint.normalizer.apply(validation.values), window)
        scores = predict_proba(checkpoint.model, np.ascontiguousarray(windows))
        labels = window_labels(validation.labels, window)
        weights = window_labels(validation.weights, window)
        return validation_quality(scores, labels, weights, checkpoint.threshold), len(labels)

    def _execute(self, decision: Decision) -> tuple[int, float]:
        """Run `decision` as the trainer's action worker does; (batches, seconds)."""
        if decision.action is Action.KEEP:
            return 0, 0.0
        assert self.stream is not None
        now = float(self.stream.timestamps(self._cursor - 1, self._cursor)[0])
        if decision.action is Action.RESET:
            self.models.reset(_VM, now=now)
            return 0, 0.0
        outcome = self.models.finetune(_VM, decision.batches, now=now,
                                       reset=decision.action is Action.RESET_FINETUNE)
        return outcome.batches, outcome.seconds

    def _play(self, start: int, stop: int) -> tuple[tuple[int, int, int, int],
                                                     tuple[float, float, float]]:
        """The agent's part for samples [start, stop): score the windows ending there
        with the VM's current model, then ship samples, verdicts and labels. Returns
        the confusion counts (tp, fp, fn, tn) and (accuracy, F1, loss) of those windows;
        windows too early to be whole are not scored."""
        from vmad.labels import LabelInterval
        from vmad.trainer.training import predict_proba
        from vmad.windows import make_windows

        assert self.stream is not None
        stream, window = self.stream, self.settings.window
        checkpoint = self.models.checkpoint(_VM)
        version = self.models.info(_VM).version
        first = max(start, window - 1)
        timestamps = stream.timestamps(start, stop)
        verdicts: list[tuple[float, float, bool, str]] = []
        counts, quality = (0, 0, 0, 0), (0.0, 0.0, 0.0)
        if first < stop:
            raw = stream.values[first - window + 1:stop]
            windows = make_windows(checkpoint.normalizer.apply(raw), window)
            scores = predict_proba(checkpoint.model, np.ascontiguousarray(windows))
            flagged = scores >= checkpoint.threshold
            truth = stream.labels[first:stop].astype(bool)
            counts = (int(np.sum(flagged & truth)), int(np.sum(flagged & ~truth)),
                      int(np.sum(~flagged & truth)), int(np.sum(~flagged & ~truth)))
            quality = quality_of(scores, truth, checkpoint.threshold)
            verdicts = [(float(t), float(p), bool(f), version) for t, p, f in
                        zip(timestamps[first - start:], scores, flagged, strict=True)]
        labels = [LabelInterval(a, b, True, "env")
                  for a, b in _anomalous_runs(self._operator_labels()[start:stop], timestamps)]
        self._store.ingest(_VM, DEFAULT_METRICS, np.arange(start + 1, stop + 1), timestamps,
                           stream.values[start:stop], verdicts=verdicts, labels=labels,
                           now=float(timestamps[-1]))
        return counts, quality

    def _close_episode(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self.models is not None:
            shutil.rmtree(self.models.models_dir, ignore_errors=True)
            self.models = None
