"""Fixed control policies the DQN is measured against (`vmad bench control`).

Each honours controller/policy.py's `Policy`, so the benchmark drives them exactly as
the controller would, one state report at a time:

- `NeverRetrain`: the pretrained detector for ever (what a fleet without a trainer runs).
- `EveryK`: fine-tune `batches` at every K-th report of a VM, whatever its state.
- `OnDrift`: fine-tune `batches` when the state's drift exceeds a threshold. Fine-tuning
  refits the normalizer on recent data (trainer/transfer.py), so drift then measures
  the distance from the data the model was last tuned on.
- `AlwaysFinetune`: fine-tune `batches` at every report (the most compute).
"""

from __future__ import annotations

from vmad.actions import Action, Decision
from vmad.state import VMState

__all__ = ["AlwaysFinetune", "EveryK", "NeverRetrain", "OnDrift"]


class _Fixed:
    name = "fixed"

    def observe(self, state: VMState, decision: Decision, reward: float,
                next_state: VMState, transition_id: int = 0) -> None:
        """Fixed policies do not learn."""

    def close(self) -> None:
        """Nothing to persist."""


class NeverRetrain(_Fixed):
    name = "never retrain"

    def decide(self, state: VMState) -> Decision:
        return Decision(Action.KEEP, 0, "never retrain")


class AlwaysFinetune(_Fixed):
    def __init__(self, batches: int = 200) -> None:
        self.batches = batches
        self.name = f"always fine-tune {batches}"

    def decide(self, state: VMState) -> Decision:
        return Decision(Action.FINETUNE, self.batches, self.name)


class EveryK(_Fixed):
    def __init__(self, k: int, batches: int = 50) -> None:
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        self.k = k
        self.batches = batches
        self.name = f"every {k} steps, {batches}"
        # Reports seen per VM: the K-th, 2K-th, ... report of each VM fine-tunes.
        self._seen: dict[str, int] = {}

    def decide(self, state: VMState) -> Decision:
        seen = self._seen.get(state.vm_id, 0) + 1
        self._seen[state.vm_id] = seen
        if seen % self.k == 0:
            return Decision(Action.FINETUNE, self.batches, f"report {seen}")
        return Decision(Action.KEEP, 0, f"report {seen}")

    def forget(self, vm_id: str) -> None:
        """Start counting `vm_id`'s reports afresh (a new VM under an old name)."""
        self._seen.pop(vm_id, None)


class OnDrift(_Fixed):
    def __init__(self, threshold: float, batches: int = 50) -> None:
        self.threshold = threshold
        self.batches = batches
        self.name = f"drift > {threshold:g}, {batches}"

    def decide(self, state: VMState) -> Decision:
        if state.drift > self.threshold:
            return Decision(Action.FINETUNE, self.batches, f"drift {state.drift:.2f}")
        return Decision(Action.KEEP, 0, f"drift {state.drift:.2f}")
