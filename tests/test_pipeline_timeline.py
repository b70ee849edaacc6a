"""Timelines: Chrome trace JSON, measured bubble, PNG Gantt chart, `megalith schedule`."""

import json

import pytest

from megalith.errors import ConfigError

from megalith.cli import main
from megalith.parallel.pipeline.actions import TimelineEvent
from megalith.parallel.pipeline.timeline import (
    describe_schedule,
    draw_gantt,
    measured_bubble,
    to_chrome_trace,
    write_chrome_trace,
)

EVENTS = [TimelineEvent(0, "F", 0, 0, 0, 1), TimelineEvent(0, "B", 0, 0, 2, 4),
          TimelineEvent(1, "F", 0, 0, 1, 2), TimelineEvent(1, "B", 0, 0, 2, 4)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_chrome_trace_has_one_complete_event_per_compute_and_a_row_per_rank(tmp_path):
    write_chrome_trace(EVENTS, tmp_path / "t.json", time_unit_us=1000)
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    complete = [e for e in trace if e["ph"] == "X"]
    assert len(complete) == 4 and {e["tid"] for e in complete} == {0, 1}
    assert complete[1] == {"name": "B c0 mb0", "cat": "B", "ph": "X", "pid": 0, "tid": 0, "ts": 2000.0,
                           "dur": 2000.0, "args": {"chunk": 0, "microbatch": 0}}
    assert [e["args"]["name"] for e in trace if e["ph"] == "M"] == ["rank 0", "rank 1"]
    assert to_chrome_trace(EVENTS)["traceEvents"][2]["ts"] == 0.0


def test_measured_bubble():
    # span 4, busy 3 on each rank: (4 - 3) / 3
    assert abs(measured_bubble(EVENTS) - 1 / 3) < 1e-12
    with pytest.raises(ConfigError, match="at least one timeline event"):
        measured_bubble([])


def test_gantt_png(tmp_path):
    draw_gantt(EVENTS, tmp_path / "g.png", "two ranks")
    data = (tmp_path / "g.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_describe_schedule_and_command(tmp_path, capsys):
    text = describe_schedule("interleaved-1f1b", 4, 2, 8, trace_path=tmp_path / "s.json", png_path=tmp_path / "s.png")
    assert "bubble: formula 0.1875, simulated 0.1875" in text
    assert (tmp_path / "s.png").read_bytes().startswith(PNG_SIGNATURE)
    assert len(json.loads((tmp_path / "s.json").read_text())["traceEvents"]) == 4 + 4 * 2 * 8 * 2
    assert main(["schedule", "--pp", "4", "--micro-batches", "8", "--schedule", "1f1b"]) == 0
    assert "bubble: formula 0.3750, simulated 0.3750" in capsys.readouterr().out
    assert main(["schedule", "--pp", "4", "--vpp", "2", "--micro-batches", "6", "--schedule", "1f1b"]) == 2
    assert "1f1b runs one model chunk per rank, got vpp 2" in capsys.readouterr().err
