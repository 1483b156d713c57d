"""The DQN policy of the central control module (Jiang 2024; Mnih et al., "Human-level
control through deep reinforcement learning", Nature 2015) on stable-baselines3's DQN.

Two halves:

- **Policy files.** A Q-network travels as a `.npz` of float arrays (`w0, b0, w1, b1,
  ...`: the linear layers of an MLP with ReLU between them) plus `meta`, a JSON string
  naming the format, the observation layout (vmad/state.py's FEATURES and the metric
  count), the action table (vmad/actions.py's CONTROL_ACTIONS) and where the
  weights came from. It is read with `allow_pickle=False`, so a policy file can carry
  numbers and nothing else; its shapes, values and tables are checked, and any mismatch
  is a `PolicyFileError` naming the file and the problem. stable-baselines3's own `.zip`
  unpickles on load: the controller only ever writes those (checkpoints of offline
  training, on its own disk) and never reads one it was sent.
- **`DQNPolicy`**, the live policy. Decides greedily on the Q-network's values, or at
  random with probability `epsilon` (off by default; at most `MAX_EPSILON` and
  `explore_per_hour` random decisions an hour fleet-wide), logs every decision with its
  Q-values, and learns: each finished transition the controller records goes to a
  stable-baselines3 replay buffer, and once `learning_starts` transitions are stored the
  Q-network takes a gradient step every `train_every` transitions, syncing its target
  network every `target_update` steps.
- **The learning state lives in the registry** (controller/registry.py), without
  pickle: every `save_every` gradient steps and on close, the online and target
  networks, Adam's moments and step counts (arrays in one `.npz` blob) and the counters
  and exploration RNG (JSON), with the id of the newest transition learned from. The
  replay buffer is the registry's transitions table itself, written before the trainer
  hears the decision. On start, `build_dqn_policy` loads the checkpoint, refills the
  buffer, and learns from the transitions recorded after the checkpoint in order: a
  kill -9 loses no transition and the gradient-step counter goes on where it would be.

Reading policy files needs NumPy only; building a `DQNPolicy` imports PyTorch and
stable-baselines3, which the controller does only when `policy.kind` is `dqn` or
`shadow`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import Field

from vmad.actions import CONTROL_ACTIONS, Decision, action_index
from vmad.config import StrictModel
from vmad.controller.policy import RulePolicy
from vmad.controller.reward import DEFAULT_GAMMA
from vmad.state import FEATURES, VMState

if TYPE_CHECKING:
    from vmad.controller.registry import Registry

__all__ = ["DEFAULT_POLICY", "LEARNER", "MAX_EPSILON", "DQNPolicy", "DQNSettings",
           "LearnerStore", "PolicyFile", "PolicyFileError", "build_dqn_policy",
           "load_policy_file", "save_policy_file"]

log = logging.getLogger("vmad.controller.dqn")

FORMAT = "vmad-q-network"
FORMAT_VERSION = 1
DEFAULT_POLICY = Path(__file__).resolve().parent / "default_policy" / "policy.npz"
"""The policy shipped with vmad, trained offline by `vmad controller train-policy`."""
MAX_EPSILON = 0.2
"""Exploration is bounded: no configuration may make more than this share of a fleet's
decisions random."""


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


class DQNSettings(StrictModel):
    """How the live DQN decides and learns (`policy.dqn` in controller.yaml)."""

    initial: Path | None = Field(
        None, description="Q-network weights (.npz) to start from while the registry holds "
                          "no learned state; empty = the default policy shipped with vmad")
    learn: bool = Field(True, description="keep learning from the fleet's transitions; "
                                          "false freezes the network")
    learning_starts: int = Field(200, ge=1, description="transitions stored before the "
                                                         "first gradient step")
    buffer_size: int = Field(50_000, ge=1, description="replay buffer capacity; the oldest "
                                                       "transitions go first")
    batch_size: int = Field(64, ge=1, description="transitions per gradient step")
    learning_rate: float = Field(1e-4, gt=0, description="Adam step size")
    train_every: int = Field(4, ge=1, description="new transitions per gradient step")
    target_update: int = Field(500, ge=1,
                               description="gradient steps between target-network syncs")
    save_every: int = Field(50, ge=1, description="gradient steps between checkpoints of the "
                                                  "learning state into the registry")
    epsilon: float = Field(0.0, ge=0, le=MAX_EPSILON,
                           description="share of decisions explored at random (0: off)")
    explore_per_hour: int = Field(30, ge=0, description="at most this many random "
                                                        "decisions per hour, fleet-wide")
    seed: int = Field(0, description="exploration and batch sampling")


def _spaces(observation_size: int) -> tuple[Any, Any]:
    from gymnasium import spaces

    return (spaces.Box(-1.0, 1.0, shape=(observation_size,), dtype=np.float32),
            spaces.Discrete(len(CONTROL_ACTIONS)))


def build_sb3_dqn(policy: PolicyFile | None, settings: DQNSettings,
                  observation_size: int | None = None, net_arch: Sequence[int] = (64, 64),
                  *, gamma: float = DEFAULT_GAMMA) -> Any:
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
                batch_size=settings.batch_size, gamma=gamma, tau=1.0,
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
    serializes `decide` and `observe`.

    Plain attributes an exporter reads as gauges and counters: `updates` (gradient
    steps, ever), `transitions` (transitions learned from, ever), `consumed_through`
    (the newest registry transition id learned from), `explorations` (random decisions,
    ever), `stored` and `explorations_last_hour` (properties), `settings.epsilon`.
    """

    name = "dqn"

    def __init__(self, policy: PolicyFile, settings: DQNSettings | None = None, *,
                 gamma: float = DEFAULT_GAMMA, store: LearnerStore | None = None,
                 fallback: RulePolicy | None = None) -> None:
        import torch

        self.settings = settings or DQNSettings()
        self.store = store
        self.fallback = fallback or RulePolicy()
        self.meta = dict(policy.meta)
        self.model = build_sb3_dqn(policy, self.settings, gamma=gamma)
        self.observation_size = policy.observation_size
        self.transitions = 0
        self.updates = 0
        self.consumed_through = 0
        self.explorations = 0
        self._explored_at: deque[float] = deque()
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

    def greedy_indices(self, states: Sequence[VMState]) -> list[int | None]:
        """The greedy action number for each state (None where the vector does not fit),
        in one forward pass: what a backtest over many logged states asks."""
        fits = [i for i, s in enumerate(states) if len(s.to_vector()) == self.observation_size]
        out: list[int | None] = [None] * len(states)
        if fits:
            batch = np.stack([states[i].to_vector() for i in fits])
            with self._torch.no_grad():
                q = self.model.q_net(self._torch.from_numpy(batch)).numpy()
            for i, best in zip(fits, np.argmax(q, axis=1), strict=True):
                out[i] = int(best)
        return out

    @property
    def explorations_last_hour(self) -> int:
        return len(self._explored_at)

    def explore(self, now: float | None = None) -> int | None:
        """A random action number when exploration is due now, else None. Bounded:
        probability `epsilon` per decision, and at most `explore_per_hour` in any
        sliding hour; each one is counted."""
        now = time.time() if now is None else now
        while self._explored_at and self._explored_at[0] <= now - 3600.0:
            self._explored_at.popleft()
        s = self.settings
        if s.epsilon <= 0 or len(self._explored_at) >= s.explore_per_hour \
                or self._rng.random() >= s.epsilon:
            return None
        self.explorations += 1
        self._explored_at.append(now)
        return int(self._rng.integers(len(CONTROL_ACTIONS)))

    def remember_explorations(self, timestamps: Iterable[float]) -> None:
        """After a restart: the random decisions of the last hour still count against
        `explore_per_hour` (the registry keeps them)."""
        self._explored_at.extend(sorted(timestamps))

    def decide(self, state: VMState, *, explore: bool = True,
               now: float | None = None) -> Decision:
        q = self.q_values(state)
        if q is None:
            # A trainer whose model takes another number of metrics reports a longer or
            # shorter vector; this network cannot read it, the rules can.
            ruled = self.fallback.decide(state)
            reason = (f"rules (state has {len(state.to_vector())} features, the DQN takes "
                      f"{self.observation_size}): {ruled.reason}")
            return Decision(ruled.action, ruled.batches, reason)
        index, how = int(np.argmax(q)), "greedy"
        explored = self.explore(now) if explore else None
        if explored is not None:
            index, how = explored, "explore"
        chosen = CONTROL_ACTIONS[index]
        values = tuple(round(float(v), 4) for v in q)
        listing = " ".join(f"{a.label}={v:.3f}" for a, v in zip(CONTROL_ACTIONS, values,
                                                                 strict=True))
        return Decision(chosen.action, chosen.batches, f"dqn {how}: Q {listing}", values)

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
                next_state: VMState, transition_id: int = 0) -> None:
        self.consumed_through = max(self.consumed_through, transition_id)
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

    # -- the learning state, kept in the registry --------------------------------------

    def learning_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything learning needs to go on, as arrays and JSON: the online and target
        networks, Adam's moments and step counts, the counters, the exploration RNG.
        (The replay buffer is the registry's own transitions table.)"""
        arrays = {f"net/{k}": v.detach().cpu().numpy().copy()
                  for k, v in self.model.policy.state_dict().items()}
        optimizer = self.model.policy.optimizer.state_dict()
        for index, slots in optimizer["state"].items():
            for slot, value in slots.items():
                arrays[f"adam/{index}/{slot}"] = np.asarray(
                    value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        meta = {**self.meta, "updates": self.updates, "transitions": self.transitions,
                "consumed_through": self.consumed_through, "explorations": self.explorations,
                "rng": self._rng.bit_generator.state, "observation_size": self.observation_size,
                "net_arch": policy_file_of(self.model).net_arch,
                "features": list(FEATURES), "actions": _action_table()}
        return arrays, meta

    def load_learning_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """The inverse of `learning_state` (shapes checked by torch's load_state_dict)."""
        torch = self._torch
        net = {k[len("net/"):]: torch.from_numpy(v) for k, v in arrays.items()
               if k.startswith("net/")}
        self.model.policy.load_state_dict(net)
        optimizer = self.model.policy.optimizer
        state: dict[int, dict[str, Any]] = {}
        for key, value in arrays.items():
            if key.startswith("adam/"):
                _, index, slot = key.split("/")
                state.setdefault(int(index), {})[slot] = torch.from_numpy(np.array(value))
        optimizer.load_state_dict({"state": state,
                                   "param_groups": optimizer.state_dict()["param_groups"]})
        self.updates = int(meta["updates"])
        self.transitions = int(meta["transitions"])
        self.consumed_through = int(meta["consumed_through"])
        self.explorations = int(meta.get("explorations", 0))
        self._rng.bit_generator.state = meta["rng"]
        self.meta = {k: v for k, v in meta.items() if k not in _LIVE_KEYS}

    def save(self) -> None:
        """Checkpoint the learning state into the registry (one transaction)."""
        if self.store is not None:
            self.store.save_learner(LEARNER, *self.learning_state())

    def close(self) -> None:
        self.save()


_LIVE_KEYS = ("updates", "transitions", "consumed_through", "explorations", "rng")
LEARNER = "dqn"
"""The registry's name for the DQN's learning state."""


class LearnerStore(Protocol):
    """Where a learning policy checkpoints itself (controller/registry.py's Registry)."""

    def save_learner(self, name: str, arrays: dict[str, np.ndarray],
                     meta: dict[str, Any]) -> None: ...

    def load_learner(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        ...


def build_dqn_policy(settings: DQNSettings, *, gamma: float, store: Registry,
                     fallback: RulePolicy) -> DQNPolicy | None:
    """The controller's DQN, going on where it stopped.

    1. The network: the learning state checkpointed in the registry (`store`) when there
       is one, else `settings.initial`, else the shipped default. None when none exists:
       the caller falls back to the rules. A file that exists but is not a valid policy
       raises `PolicyFileError` (an operator's file is wrong: say so, do not guess).
    2. The replay buffer: the registry's newest `buffer_size` transitions up to the
       checkpoint.
    3. Catch-up: transitions recorded after the checkpoint (a crash came before the next
       one) are learned from now, in order, exactly as they would have been live; so
       a kill -9 loses no transition and the step counter goes on where it would be.
       Without a checkpoint (a first start), the history only fills the buffer, and a
       checkpoint is written at once.
    """
    saved = store.load_learner(LEARNER)
    if saved is not None:
        arrays, meta = saved
        if meta.get("features") != list(FEATURES) or meta.get("actions") != _action_table():
            raise PolicyFileError(f"{store.path}: the learned DQN state was trained on "
                                  f"features {meta.get('features')} and actions "
                                  f"{meta.get('actions')}, not this controller's")
        layers = tuple((arrays[f"net/q_net.q_net.{2 * i}.weight"],
                        arrays[f"net/q_net.q_net.{2 * i}.bias"])
                       for i in range(len(meta["net_arch"]) + 1))
        dqn = DQNPolicy(PolicyFile(layers, meta), settings, gamma=gamma, store=store,
                        fallback=fallback)
        dqn.load_learning_state(arrays, meta)
        log.info("DQN learning state from %s: %d gradient steps, %d transitions learned "
                 "(through transition %d)", store.path, dqn.updates, dqn.transitions,
                 dqn.consumed_through)
    else:
        source = settings.initial if settings.initial is not None else DEFAULT_POLICY
        if not source.is_file():
            if settings.initial is not None:
                raise PolicyFileError(f"{source}: no such policy file (policy.dqn.initial)")
            log.warning("no DQN policy at %s: deciding with the rules", source)
            return None
        policy = load_policy_file(source)
        log.info("DQN policy from %s (%s)", source, policy.meta.get("trained", "no provenance"))
        dqn = DQNPolicy(policy, settings, gamma=gamma, store=store, fallback=fallback)
        # A first start (or a switch from the rules) learns from what arrives from now
        # on: the history fills the replay buffer but is not replayed as gradient steps.
        newest = store.transitions(1, newest=True)
        dqn.consumed_through = newest[0].transition_id if newest else 0
    restored = dqn.restore((t.state, t.decision, t.reward, t.next_state) for t in
                           store.transitions(settings.buffer_size, newest=True,
                                             through=dqn.consumed_through))
    log.info("DQN replay buffer: %d transitions restored from %s", restored, store.path)
    missed = store.transitions(after=dqn.consumed_through)
    for t in missed:
        dqn.observe(t.state, t.decision, t.reward, t.next_state, t.transition_id)
    if missed:
        log.info("DQN caught up on %d transitions recorded after its last checkpoint "
                 "(now %d gradient steps)", len(missed), dqn.updates)
    if missed or saved is None:
        dqn.save()  # a crash from here on catches up from this checkpoint
    dqn.remember_explorations(store.exploration_times(time.time() - 3600.0))
    return dqn
