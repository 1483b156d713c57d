"""A labelled interval of one VM's time line: the contract between whoever labels (an
operator's `vmad label`, `vmad inject`, a replayed data set) and the trainer that stores
and learns from it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LabelInterval"]


@dataclass(frozen=True)
class LabelInterval:
    """[start, end] in Unix seconds; `source` says who labelled it (injection, operator);
    `id`, when set, names the interval so a resent copy is stored once."""

    start: float
    end: float
    anomalous: bool
    source: str = ""
    id: str = ""
