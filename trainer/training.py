"""Supervised training of a detector on labelled windows: pretraining and transfer
fine-tuning share this one loop.

Class imbalance: anomalous windows are a few percent of the data, so each mini-batch is
drawn with a fixed share of anomalous windows (`positive_share`) instead of weighting
the loss; calibration is then off, which is why a threshold is picked on labelled data
after training instead of trusting 0.5.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vmad.trainer.models import early_layers

__all__ = ["TrainConfig", "TrainResult", "predict_proba", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run.

    max_batches: mini-batches to run at most (the paper fine-tunes with fewer than 200).
    batch_size: windows per mini-batch.
    lr: Adam learning rate.
    weight_decay: L2 penalty; small models on a few thousand windows overfit quickly.
    positive_share: share of anomalous windows drawn into each batch (when any exist).
    freeze_early: keep the feature layers fixed and train only the classifier.
    eval_every / patience: with validation data, evaluate every `eval_every` batches and
        stop after `patience` evaluations without improvement, keeping the best weights.
    seed: makes batch sampling, dropout and initialisation repeatable.
    """

    max_batches: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    positive_share: float = 0.3
    freeze_early: bool = False
    eval_every: int = 25
    patience: int = 4
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    batches: int
    final_loss: float
    best_validation_loss: float | None
    seconds: float
    stopped_early: bool


class BatchSampler:
    """Draws mini-batch indices with a fixed share of anomalous windows."""

    def __init__(self, labels: np.ndarray, config: TrainConfig,
                 weights: np.ndarray | None = None) -> None:
        self.rng = np.random.default_rng(config.seed)
        self.batch_size = config.batch_size
        labels = np.asarray(labels)
        self.positive = np.flatnonzero(labels > 0)
        self.negative = np.flatnonzero(labels <= 0)
        self.share = config.positive_share if len(self.positive) and len(self.negative) else None
        self.weights = weights

    def _draw(self, pool: np.ndarray, count: int) -> np.ndarray:
        if self.weights is None:
            return pool[self.rng.integers(0, len(pool), count)]
        p = self.weights[pool]
        return self.rng.choice(pool, size=count, p=p / p.sum())

    def sample(self) -> np.ndarray:
        if self.share is None:
            pool = self.positive if len(self.positive) else self.negative
            return self._draw(pool, self.batch_size)
        n_pos = int(self.rng.binomial(self.batch_size, self.share))
        return np.concatenate([
            self._draw(self.positive, n_pos), self._draw(self.negative, self.batch_size - n_pos)
        ])


def train(
    model: nn.Module,
    windows: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig = TrainConfig(),
    *,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    sample_weights: np.ndarray | None = None,
    progress: str | None = None,
) -> TrainResult:
    """Train `model` in place on normalized `windows[W, M, T]` with 0/1 `labels[W]`.

    `sample_weights[W]` (optional) biases which windows are drawn, e.g. to keep a small
    source domain from dominating. `progress` is a description: show a rich progress bar.
    """
    if len(windows) != len(labels):
        raise ValueError(f"{len(windows)} windows but {len(labels)} labels")
    if len(windows) == 0:
        raise ValueError("cannot train on zero windows")
    torch.manual_seed(config.seed)
    frozen = early_layers(model) if config.freeze_early else []
    for layer in frozen:
        layer.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    sampler = BatchSampler(labels, config, sample_weights)
    labels_f = np.asarray(labels, dtype=np.float32)
    started = time.perf_counter()
    best_loss, best_state, stale, stopped_early = None, None, 0, False
    if validation is not None:
        # The starting weights are a candidate too: fine-tuning a pretrained model on a
        # few target events can make it worse, and then the pretrained weights should stay.
        best_loss = validation_loss(model, *validation)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    running = float("nan")
    batches = 0
    bar = _ProgressBar(progress, config.max_batches)
    try:
        for batches in range(1, config.max_batches + 1):
            model.train()
            for layer in frozen:
                layer.eval()
            index = sampler.sample()
            x = torch.from_numpy(np.ascontiguousarray(windows[index], dtype=np.float32))
            y = torch.from_numpy(labels_f[index])
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            running = value if np.isnan(running) else 0.95 * running + 0.05 * value
            bar.advance(running)
            if validation is not None and batches % config.eval_every == 0:
                val_loss = validation_loss(model, *validation)
                if best_loss is None or val_loss < best_loss - 1e-4:
                    best_loss, stale = val_loss, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    stale += 1
                    if stale >= config.patience:
                        stopped_early = True
                        break
    finally:
        bar.close()
        for layer in frozen:
            layer.requires_grad_(True)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(batches, running, best_loss, time.perf_counter() - started, stopped_early)


def validation_loss(model: nn.Module, windows: np.ndarray, labels: np.ndarray) -> float:
    """Class-balanced BCE: the mean loss over anomalous and over normal windows, averaged,
    so a validation set with few anomalies still rewards finding them."""
    probabilities = np.clip(predict_proba(model, windows), 1e-6, 1 - 1e-6)
    labels = np.asarray(labels) > 0
    losses = np.where(labels, -np.log(probabilities), -np.log(1 - probabilities))
    parts = [losses[labels].mean() if labels.any() else None,
             losses[~labels].mean() if (~labels).any() else None]
    return float(np.mean([p for p in parts if p is not None]))


@torch.no_grad()
def predict_logits(model: nn.Module, windows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Anomaly logit per window for normalized `windows[W, M, T]`."""
    model.eval()
    out = np.empty(len(windows), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            chunk = np.ascontiguousarray(windows[start:start + batch_size], dtype=np.float32)
            out[start:start + len(chunk)] = model(torch.from_numpy(chunk)).numpy()
    return out


def predict_proba(model: nn.Module, windows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Anomaly probability per window for normalized `windows[W, M, T]`."""
    logits = predict_logits(model, windows, batch_size)
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def calibrated_threshold(model: nn.Module, windows: np.ndarray,
                         labels: np.ndarray) -> float | None:
    """The best-F1 threshold of `model`'s probabilities on normalized `windows` with
    `labels` (how a checkpoint's own threshold is calibrated); None when the labels hold
    one class."""
    from vmad.evaluation import best_f1_threshold

    labels = np.asarray(labels)
    if not labels.any() or labels.all():
        return None
    return best_f1_threshold(labels, predict_proba(model, windows))


class _ProgressBar:
    """A rich progress bar when a description is given and stderr is a terminal or CI log."""

    def __init__(self, description: str | None, total: int) -> None:
        self._progress = None
        if description is None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._progress = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            "loss {task.fields[loss]:.4f}", TimeRemainingColumn(), transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, loss=float("nan"))

    def advance(self, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
