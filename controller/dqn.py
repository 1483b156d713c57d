"""The DQN policy of the central control module (Jiang 2024; Mnih et al., "Human-level
control through deep reinforcement learning", Nature 2015) on stable-baselines3's DQN.

Two halves:

- **Policy files.** A Q-network travels as a `.npz` of float arrays (`w0, b0, w1, b1,
  ...`: the linear layers of an MLP with ReLU between them) plus `meta`, a JSON string
  naming the format, the observation layout (trainer/state.py's FEATURES and the metric
  count), the action table (controller/policy.py's CONTROL_ACTIONS) and where the
  weights came from. It is read with `allow_pickle=False`, so a policy file can carry
  numbers and nothing else; its shapes, values and tables are checked, and any mismatch
  is a `PolicyFileError` naming the file and the problem. stable-baselines3's own `.zip`
  unpickles on load: the controller only ever writes those (checkpoints of offline
  training, on its own disk) and never reads one it was sent.
- **`DQNPolicy`**, the live policy. Decides greedily on the Q-network's values (with
  `epsilon` exploration when configured; off by default), logs every decision with its
  Q-values, and learns: each finished transition the controller records goes to a
  stable-baselines3 replay buffer, and once `learning_starts` transitions are stored the
  Q-network takes a gradient step every `train_every` transitions, syncing its target
  network every `target_update` steps. Its weights are saved to its own state file every
  `save_every` steps and on close; after a restart the controller refills the replay
  buffer from the transitions its registry kept, so nothing learned is lost.

Reading policy files needs NumPy only; building a `DQNPolicy` imports PyTorch and
stable-baselines3, which the controller does only when `policy.kind` is `dqn`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmad.actions import CONTROL_ACTIONS, Decision, action_index
from vmad.controller.policy import RulePolicy
from vmad.state import FEATURES, VMState

__all__ = ["DEFAULT_POLICY", "DQNPolicy", "DQNSettings", "PolicyFile", "PolicyFileError",
           "build_dqn_policy", "load_policy_file", "save_policy_file"]

log = logging.getLogger("vmad.controller.dqn")

FORMAT = "vmad-q-network"
FORMAT_VERSION = 1
DEFAULT_POLICY = Path(__file__).resolve().parent / "default_policy" / "policy.npz"
"""The policy shipped with vmad, trained offline by `vmad controller train-policy`."""


class PolicyFileError(ValueError):
    """A policy file that is missing, not a policy, corrupt, or does not fit."""


def _action_table() -> list[list[Any]]:
    return [[a.action.value, a.batches] for a in CONTROL_ACTIONS]


@dataclass(frozen=True)
class PolicyFile:
    """A Q-network as plain arrays: `layers[i] = (weight[out, in], bias[out])`."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def observation_size(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def net_arch(self) -> list[int]:
        return [int(w.shape[0]) for w, _ in self.layers[:-1]]

    def q_values(self, observation: np.ndarray) -> np.ndarray:
        """Q-values of one observation, in NumPy (what `bench control` and tests use to
        check the torch network against the file)."""
        x = np.asarray(observation, dtype=np.float32)
        for i, (w, b) in enumerate(self.layers):
            x = w @ x + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return x


def save_policy_file(path: str | Path, policy: PolicyFile) -> Path:
    """Write atomically (a crash leaves the old file or the new one, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**policy.meta, "format": FORMAT, "format_version": FORMAT_VERSION,
            "features": list(FEATURES), "actions": _action_table(),
            "observation_size": policy.observation_size}
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for i, (w, b) in enumerate(policy.layers):
        arrays[f"w{i}"] = np.asarray(w, dtype=np.float32)
        arrays[f"b{i}"] = np.asarray(b, dtype=np.float32)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def load_policy_file(path: str | Path) -> PolicyFile:
    """Read and check a policy file; `PolicyFileError` names what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise PolicyFileError(f"{path}: no such policy file") from None
    except OSError as error:
        raise PolicyFileError(f"{path}: cannot read: {error.strerror}") from None
    if magic != b"PK\x03\x04":
        raise PolicyFileError(f"{path}: not a policy file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise PolicyFileError(f"{path}: no such policy file") from None
    except ValueError as error:
        # numpy says "Object arrays cannot be loaded when allow_pickle=False" here.
        raise PolicyFileError(f"{path}: not a policy file ({error})") from None
    except (OSError, EOFError) as error:
        raise PolicyFileError(f"{path}: not a readable .npz policy file ({error})") from None
    except Exception as error:  # zipfile.BadZipFile and friends: corrupt archives
        raise PolicyFileError(f"{path}: corrupt policy file ({error})") from None
    if "meta" not in arrays or arrays["meta"].dtype.kind != "U":
        raise PolicyFileError(f"{path}: no 'meta' entry: not a vmad policy file")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as error:
        raise PolicyFileError(f"{path}: 'meta' is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PolicyFileError(f"{path}: meta.format is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PolicyFileError(f"{path}: unsupported format_version "
                              f"{meta.get('format_version')!r} (this vmad reads "
                              f"{FORMAT_VERSION})")
    if meta.get("actions") != _action_table():
        raise PolicyFileError(f"{path}: its actions {meta.get('actions')} are not this "
                              f"controller's {_action_table()}")
    if meta.get("features") != list(FEATURES):
        raise PolicyFileError(f"{path}: trained on state features {meta.get('features')}, "
                              f"this controller reports {list(FEATURES)}")
    layers = []
    for i in range(len(arrays)):
        if f"w{i}" not in arrays:
            break
        if f"b{i}" not in arrays:
            raise PolicyFileError(f"{path}: layer {i} has weights w{i} but no bias b{i}")
        layers.append((arrays[f"w{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32)))
    if not layers:
        raise PolicyFileError(f"{path}: no layers (w0, b0, ...)")
    width = int(meta.get("observation_size", -1))
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[1] != width:
            raise PolicyFileError(f"{path}: layer {i} has shapes w{w.shape} b{b.shape}; "
                                  f"expected [out, {width}] and [out]")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise PolicyFileError(f"{path}: layer {i} holds NaN or infinite values")
        width = w.shape[0]
    if width != len(CONTROL_ACTIONS):
        raise PolicyFileError(f"{path}: the network has {width} outputs for "
                              f"{len(CONTROL_ACTIONS)} actions")
    return PolicyFile(tuple(layers), meta)


@dataclass(frozen=True)
class DQNSettings:
    """How the live DQN decides and learns (`policy.dqn` in controller.yaml).

    learning_starts: transitions stored before the first gradient step (the paper: the
        DQN starts learning only once enough data is stored). buffer_size: replay buffer
        capacity; the oldest go first. batch_size: transitions per gradient step.
    learning_rate: Adam step size. train_every: new transitions per gradient step.
    target_update: gradient steps between copies of the Q-network to its target.
    save_every: gradient steps between saves of the weights. gamma: discount.
    epsilon: share of decisions taken at random to explore (0: always greedy).
    learn: False freezes the network (evaluation, or an operator's choice).
    """

    learning_starts: int = 200
    buffer_size: int = 50_000
    batch_size: int = 64
    learning_rate: float = 1e-4
    train_every: int = 4
    target_update: int = 500
    save_every: int = 50
    gamma: float = 0.9
    epsilon: float = 0.0
    learn: bool = True
    seed: int = 0


def _spaces(observation_size: int) -> tuple[Any, Any]:
    from gymnasium import spaces

    return (spaces.Box(-1.0, 1.0, shape=(observation_size,), dtype=np.float32),
            spaces.Discrete(len(CONTROL_ACTIONS)))


def build_sb3_dqn(policy: PolicyFile | None, settings: DQNSettings,
                  observation_size: int | None = None, net_arch: Sequence[int] = (64, 64)
                  ) -> Any:
    """A stable-baselines3 DQN with `policy`'s weights (fresh ones when None), its replay
    buffer empty. No environment: the controller feeds transitions itself."""
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.logger import configure

    size = policy.observation_size if policy is not None else observation_size
    if size is None:
        raise ValueError("need a policy file or an observation size")
    arch = policy.net_arch if policy is not None else list(net_arch)
    model = DQN("MlpPolicy", None, learning_rate=settings.learning_rate,
                buffer_size=settings.buffer_size, learning_starts=settings.learning_starts,
                batch_size=settings.batch_size, gamma=settings.gamma, tau=1.0,
                target_update_interval=settings.target_update, seed=settings.seed,
                policy_kwargs={"net_arch": arch}, device="cpu", _init_setup_model=False)
    # What stable-baselines3's own `load` does for a model without an environment.
    model.observation_space, model.action_space = _spaces(size)
    model.n_envs = 1
    model._setup_model()
    model.set_logger(configure(None, []))
    if policy is not None:
        linears = [m for m in model.q_net.q_net if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for layer, (w, b) in zip(linears, policy.layers, strict=True):
                layer.weight.copy_(torch.from_numpy(w))
                layer.bias.copy_(torch.from_numpy(b))
        model.q_net_target.load_state_dict(model.q_net.state_dict())
    return model


def policy_file_of(model: Any, meta: dict[str, Any] | None = None) -> PolicyFile:
    """The Q-network of a stable-baselines3 DQN as a `PolicyFile`."""
    import torch

    linears = [m for m in model.q_net.q_net if isinstance(m, torch.nn.Linear)]
    layers = tuple((m.weight.detach().cpu().numpy().copy(), m.bias.detach().cpu().numpy().copy())
                   for m in linears)
    return PolicyFile(layers, dict(meta or {}))


class DQNPolicy:
    """The live DQN (see the module docstring). Not thread-safe: the controller's core
    serializes `decide` and `observe`."""

    name = "dqn"

    def __init__(self, policy: PolicyFile, settings: DQNSettings | None = None,
                 state_path: str | Path | None = None,
                 fallback: RulePolicy | None = None) -> None:
        import torch

        self.settings = settings or DQNSettings()
        self.state_path = Path(state_path) if state_path is not None else None
        self.fallback = fallback or RulePolicy()
        self.meta = dict(policy.meta)
        self.model = build_sb3_dqn(policy, self.settings)
        self.observation_size = policy.observation_size
        self.transitions = int(self.meta.get("live_transitions", 0))
        self.updates = int(self.meta.get("live_updates", 0))
        self._rng = np.random.default_rng(self.settings.seed)
        self._torch = torch

    # -- deciding ----------------------------------------------------------------------

    def q_values(self, state: VMState) -> np.ndarray | None:
        """Q-values for `state`, or None when its vector does not fit the network."""
        vector = state.to_vector()
        if vector.shape != (self.observation_size,):
            return None
        with self._torch.no_grad():
            q = self.model.q_net(self._torch.from_numpy(vector[None, :]))
        return q[0].numpy().astype(np.float64)

    def decide(self, state: VMState) -> Decision:
        q = self.q_values(state)
        if q is None:
            # A trainer whose model takes another number of metrics reports a longer or
            # shorter vector; this network cannot read it, the rules can.
            ruled = self.fallback.decide(state)
            reason = (f"rules (state has {len(state.to_vector())} features, the DQN takes "
                      f"{self.observation_size}): {ruled.reason}")
            log.info("VM %s: %s %d: %s", state.vm_id, ruled.action.value, ruled.batches, reason)
            return Decision(ruled.action, ruled.batches, reason)
        greedy = int(np.argmax(q))
        index, how = greedy, "greedy"
        if self.settings.epsilon > 0 and self._rng.random() < self.settings.epsilon:
            index, how = int(self._rng.integers(len(CONTROL_ACTIONS))), "explore"
        chosen = CONTROL_ACTIONS[index]
        values = tuple(round(float(v), 4) for v in q)
        listing = " ".join(f"{a.label}={v:.3f}" for a, v in zip(CONTROL_ACTIONS, values,
                                                                 strict=True))
        reason = f"dqn {how}: Q {listing}"
        log.info("VM %s: %s %d (%s)", state.vm_id, chosen.action.value, chosen.batches, reason)
        return Decision(chosen.action, chosen.batches, reason, values)

    # -- learning ----------------------------------------------------------------------

    @property
    def stored(self) -> int:
        """Transitions in the replay buffer now."""
        return int(self.model.replay_buffer.size())

    def _add(self, state: VMState, decision: Decision, reward: float,
             next_state: VMState) -> bool:
        obs, next_obs = state.to_vector(), next_state.to_vector()
        if obs.shape != (self.observation_size,) or next_obs.shape != obs.shape \
                or not math.isfinite(reward):
            return False
        self.model.replay_buffer.add(obs[None, :], next_obs[None, :],
                                     np.array([action_index(decision)]),
                                     np.array([reward], dtype=np.float32),
                                     np.array([False]), [{}])
        return True

    def restore(self, transitions: Iterable[tuple[VMState, Decision, float, VMState]]) -> int:
        """Refill the replay buffer (after a restart) without learning; returns how many
        transitions fit the network."""
        return sum(self._add(*t) for t in transitions)

    def observe(self, state: VMState, decision: Decision, reward: float,
                next_state: VMState) -> None:
        if not self._add(state, decision, reward, next_state):
            return
        self.transitions += 1
        s = self.settings
        if not s.learn or self.stored < s.learning_starts or self.transitions % s.train_every:
            return
        self.model.train(gradient_steps=1, batch_size=s.batch_size)
        self.updates += 1
        if self.updates % s.target_update == 0:
            self.model.q_net_target.load_state_dict(self.model.q_net.state_dict())
        if self.updates % s.save_every == 0:
            self.save()
        if self.updates == 1:
            log.info("DQN started learning: %d transitions stored (learning_starts %d)",
                     self.stored, s.learning_starts)

    def policy_file(self) -> PolicyFile:
        meta = {**self.meta, "live_transitions": self.transitions,
                "live_updates": self.updates}
        return policy_file_of(self.model, meta)

    def save(self) -> Path | None:
        if self.state_path is None:
            return None
        return save_policy_file(self.state_path, self.policy_file())

    def close(self) -> None:
        self.save()


def build_dqn_policy(settings: DQNSettings, *, state_path: Path, initial: Path | None,
                     fallback: RulePolicy) -> DQNPolicy | None:
    """The controller's DQN: its own learned weights at `state_path` when it has any,
    else `initial` (default: the shipped policy). None when neither exists: the caller
    falls back to the rules. A file that exists but is not a valid policy raises
    `PolicyFileError` (an operator's file is wrong: say so, do not guess)."""
    if state_path.is_file():
        source = state_path
    else:
        source = initial if initial is not None else DEFAULT_POLICY
        if not source.is_file():
            if initial is not None:
                raise PolicyFileError(f"{initial}: no such policy file (policy.dqn.initial)")
            log.warning("no DQN policy at %s or %s: deciding with the rules", state_path, source)
            return None
    policy = load_policy_file(source)
    log.info("DQN policy from %s (%s)", source, policy.meta.get("trained", "no provenance"))
    return DQNPolicy(policy, settings, state_path, fallback)
