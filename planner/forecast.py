"""Forecasters of hourly peak usage: seasonal-naive and a small LSTM (PyTorch).

Why hourly peaks: a reservation must cover the peak, not the mean, and weekly horizons
need a week of outputs; the hourly maximum keeps every peak while making the sequence
12x shorter than the 5-minute trace, so the LSTM trains in seconds on a CPU.

The LSTM reads the last ``input_len`` hours (value scaled by the history's peak, and the
hour of the week as sin/cos) and predicts the next ``output_len`` hours; the horizon is
reached by feeding predictions back (rolled forward). It is updated online: each new
period fine-tunes the live model for a few epochs, and forecasting runs on a copy so the
roll-forward never touches the live model's state (the paper keeps such a copy too).
torch is imported inside this module only, which nothing imports at start-up.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["LSTMForecaster", "seasonal_naive"]

HOURS_PER_WEEK = 168


def seasonal_naive(history: np.ndarray, horizon: int, season: int = HOURS_PER_WEEK) -> np.ndarray:
    """Repeat the last full season: the forecast every learned model must beat."""
    x = np.asarray(history, dtype=np.float64)
    if x.size < season:
        return np.full(horizon, float(x.max()))
    last = x[-season:]
    return np.resize(last, horizon)


def _time_features(hours: np.ndarray) -> np.ndarray:
    angle = 2 * np.pi * (hours % HOURS_PER_WEEK) / HOURS_PER_WEEK
    day = 2 * np.pi * (hours % 24) / 24
    return np.stack([np.sin(angle), np.cos(angle), np.sin(day), np.cos(day)], axis=-1)


class _Net(nn.Module):
    def __init__(self, hidden: int, output_len: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, hidden, batch_first=True)
        self.head = nn.Linear(hidden, output_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class LSTMForecaster:
    """Small LSTM on hourly peaks.

    hidden: LSTM width (32 is enough for one VM's weekly shape; larger overfits 2 weeks).
    input_len / output_len: hours read / hours predicted per step.
    epochs / finetune_epochs: first fit / each online update.
    """

    def __init__(
        self,
        hidden: int = 32,
        input_len: int = 72,
        output_len: int = 24,
        epochs: int = 30,
        finetune_epochs: int = 5,
        lr: float = 5e-3,
        seed: int = 0,
    ) -> None:
        self.input_len, self.output_len = input_len, output_len
        self.epochs, self.finetune_epochs, self.lr = epochs, finetune_epochs, lr
        torch.manual_seed(seed)
        self.net = _Net(hidden, output_len)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.scale = 1.0
        self.fitted = False

    def _examples(self, values: np.ndarray, hour0: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = values.size - self.input_len - self.output_len + 1
        if n < 1:
            raise ValueError(
                f"need {self.input_len + self.output_len} hours to train, got {values.size}"
            )
        hours = hour0 + np.arange(values.size)
        feats = np.concatenate([(values / self.scale)[:, None], _time_features(hours)], axis=1)
        idx = np.arange(n)[:, None] + np.arange(self.input_len)[None, :]
        x = feats[idx]
        y = (values / self.scale)[idx[:, -1:] + 1 + np.arange(self.output_len)[None, :]]
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def fit(self, values: np.ndarray, hour0: int = 0) -> LSTMForecaster:
        """Train (first call) or fine-tune (later calls) on hourly peaks; hour0 = hour of week."""
        values = np.asarray(values, dtype=np.float64)
        if not self.fitted:
            # Fixed once: later fine-tuning must see inputs on the same scale.
            self.scale = max(float(values.max()), 1e-6)
        x, y = self._examples(values, hour0)
        epochs = self.finetune_epochs if self.fitted else self.epochs
        self.net.train()
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0])
            for batch in perm.split(64):
                self.opt.zero_grad()
                loss = nn.functional.mse_loss(self.net(x[batch]), y[batch])
                loss.backward()
                self.opt.step()
        self.fitted = True
        return self

    @torch.no_grad()
    def forecast(self, history: np.ndarray, horizon: int, hour0: int = 0) -> np.ndarray:
        """Roll forward from the end of ``history`` (hour0 = hour of week of its first hour)."""
        if not self.fitted:
            raise RuntimeError("fit before forecast")
        frozen = copy.deepcopy(self.net).eval()
        window = list(np.asarray(history[-self.input_len :], dtype=np.float64) / self.scale)
        start = hour0 + len(history) - len(window)
        out: list[float] = []
        while len(out) < horizon:
            hours = start + np.arange(len(window) - self.input_len, len(window))
            feats = np.concatenate(
                [np.asarray(window[-self.input_len :])[:, None], _time_features(hours)], axis=1
            )
            pred = frozen(torch.tensor(feats[None], dtype=torch.float32))[0].numpy()
            out.extend(pred.tolist())
            window.extend(pred.tolist())
        return np.asarray(out[:horizon]) * self.scale
