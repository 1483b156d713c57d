"""Out of the box, end to end: a real `vmad trainer` and a real `vmad agent` on this host,
the shipped bundle and production defaults (no label, `assume_normal_unlabelled: false`),
only the warm-up shortened to 200 samples at 0.1 s. The agent warms up without alarms,
the trainer adapts it from its own samples and pushes its bundle, the host's ordinary
load stays quiet, and a real `vmad inject memory-leak` is flagged with memory to blame.

Bounds leave room for a loaded 2-core machine: at most 15 % of the quiet windows flagged
(a 20 s warm-up fits the threshold on little history, and the trainer, the test runner
and other jobs write to the same disk the agent watches; the pooled model would flag
nearly all of them), and a window blaming memory flagged within
the leak's real duration (`vmad inject` takes longer than asked on a loaded host) plus
10 s, counted from the moment the injection starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.out_of_box import run_out_of_box

pytestmark = pytest.mark.integration

LEAK_S = 6.0


def test_fresh_agent_warms_up_quietly_then_flags_a_real_leak(tmp_path: Path) -> None:
    result = run_out_of_box(tmp_path, interval_s=0.1, warmup=200, quiet_s=15.0, leak_s=LEAK_S,
                            memory_share=0.1, detect_within_s=10)
    assert result["warmup_logged"], "warm-up not in the agent's log"
    assert result["warmup_windows"] > 0 and result["flagged_during_warmup"] == 0
    assert result["quiet_windows"] >= 50
    assert result["quiet_false_alarm_rate"] <= 0.15, result
    assert result["detection_delay_s"] is not None, f"leak not flagged: {result}"
    assert result["detection_delay_s"] <= result["leak_really_lasted_s"] + 10, result
