"""Metric writers (JSON lines, TensorBoard, offline W&B) and the terminal-only progress bar."""

import io
import json
import struct
import sys
import threading

import pytest

from megalith.errors import ConfigError
from megalith.training import progress
from megalith.training.writers import (
    JsonLinesWriter,
    MetricsWriters,
    TensorBoardWriter,
    open_writers,
    scalars_for,
    wandb_api_key_available,
    wandb_mode,
)


def record(iteration, loss, grad_norm=1.5):
    """A record shaped like log_line.as_json_record, with numbers that differ per iteration."""
    return {
        "iteration": iteration,
        "train_iters": 30,
        "consumed_samples": iteration * 8,
        "elapsed_ms": 250.0 + iteration,
        "tflops_per_device": 0.5,
        "tokens_per_s": 4096.0 + iteration,
        "lr": 1e-3 * iteration,
        "global_batch_size": 8,
        "lm_loss": loss,
        "loss_scale": 1.0,
        "grad_norm": grad_norm,
        "skipped": 0,
        "nan_iterations": 0,
        "timestamp": "2024-05-01T12:00:00",
    }


RECORDS = [record(10, 7.25), record(20, 6.5, grad_norm=None), record(30, 5.75, grad_norm=0.5)]


def test_scalars_use_megatron_names_and_units():
    assert scalars_for({**record(10, 7.25), "mtp loss": 0.125, "note": "text", "flag": True}) == {
        "samples vs steps": 80,
        "iteration-time": pytest.approx(0.26),  # Megatron plots seconds
        "throughput": 0.5,
        "tokens-per-second": 4106.0,
        "learning-rate": pytest.approx(0.01),
        "batch-size": 8,
        "lm loss": 7.25,
        "loss-scale": 1.0,
        "grad-norm": 1.5,
        "num-skipped-iterations": 0,
        "num-nan-iterations": 0,
        "mtp loss": 0.125,
    }
    assert "grad-norm" not in scalars_for(record(20, 6.5, grad_norm=None))


def test_json_lines_parse_back_and_are_flushed_per_line(tmp_path):
    path = tmp_path / "logs" / "run1" / "metrics.jsonl"  # parent folders do not exist yet
    writer = JsonLinesWriter(path)
    for rec in RECORDS:
        writer.write(rec, rec["iteration"])
    # readable before close: every line is flushed as it is written
    assert [json.loads(line) for line in path.read_text().splitlines()] == RECORDS
    writer.close()


def test_json_lines_append_on_resume_and_add_a_missing_iteration(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriters([JsonLinesWriter(path)]) as writers:
        writers.write({"lm_loss": 2.0}, 5)
    with MetricsWriters([JsonLinesWriter(path)]) as writers:
        writers.write({"lm_loss": 1.0}, 6)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"iteration": 5, "lm_loss": 2.0},
        {"iteration": 6, "lm_loss": 1.0},
    ]


def test_json_lines_to_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--log-json .* is a directory; give a file path") as err:
        JsonLinesWriter(tmp_path)
    assert "\n" not in str(err.value)


def test_json_lines_under_a_file_is_a_config_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(ConfigError) as err:
        JsonLinesWriter(blocker / "metrics.jsonl")
    assert str(err.value).startswith(f"--log-json {blocker / 'metrics.jsonl'}: cannot write there (")
    assert str(err.value).endswith("; choose a writable location")


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    writer = TensorBoardWriter(log_dir, run_config={"seq_length": 128})
    for rec in RECORDS:
        writer.write(rec, rec["iteration"])
    writer.close()
    assert list(log_dir.glob("events.out.tfevents.*")), "no event file written"

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()

    def series(tag):
        return [(event.step, event.value) for event in events.Scalars(tag)]

    assert series("lm loss") == [(10, 7.25), (20, 6.5), (30, 5.75)]  # exact in float32
    assert series("grad-norm") == [(10, 1.5), (30, 0.5)]  # the None of iteration 20 is not plotted
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in series("iteration-time")] == [(10, 0.26), (20, 0.27), (30, 0.28)]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in series("learning-rate")] == [(10, 0.01), (20, 0.02), (30, 0.03)]
    assert series("tokens-per-second") == [(10, 4106.0), (20, 4116.0), (30, 4126.0)]
    assert series("num-skipped-iterations") == [(10, 0.0), (20, 0.0), (30, 0.0)]
    assert series("lm loss vs samples") == [(80, 7.25), (160, 6.5), (240, 5.75)]
    assert "seq_length/text_summary" in events.Tags()["tensors"]


def test_missing_tensorboard_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ConfigError) as err:
        open_writers(log_json=None, tensorboard_dir=str(tmp_path), wandb_project=None, wandb_exp_name=None,
                     wandb_save_dir=None, run_config={})
    assert str(err.value) == "--tensorboard-dir needs the tensorboard package (a megalith dependency); pip install tensorboard"


def test_missing_wandb_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError) as err:
        open_writers(log_json=None, tensorboard_dir=None, wandb_project="p", wandb_exp_name="n",
                     wandb_save_dir=None, run_config={})
    assert str(err.value) == "--wandb-project needs the wandb package (a megalith dependency); pip install wandb"


def test_wandb_project_needs_an_experiment_name_as_in_megatron():
    with pytest.raises(ConfigError, match=r"^--wandb-project p needs --wandb-exp-name; add --wandb-exp-name NAME"):
        open_writers(log_json=None, tensorboard_dir=None, wandb_project="p", wandb_exp_name=None,
                     wandb_save_dir=None, run_config={})


def test_no_flags_no_writers(tmp_path):
    writers = open_writers(log_json=None, tensorboard_dir=None, wandb_project="", wandb_exp_name="ignored",
                           wandb_save_dir=None, run_config={})
    assert not writers
    writers.write(RECORDS[0], 10)  # nothing to do, nothing fails
    writers.close()


def test_wandb_goes_offline_only_without_any_way_to_log_in(tmp_path):
    missing = tmp_path / "no-netrc"
    other_host = tmp_path / "other.netrc"
    other_host.write_text("machine github.com login me password secret\n")
    wandb_host = tmp_path / "wandb.netrc"
    wandb_host.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    broken = tmp_path / "broken.netrc"
    broken.write_text("machine\n")

    assert wandb_mode({}, missing) == "offline"
    assert wandb_mode({}, other_host) == "offline"
    assert wandb_mode({}, broken) == "offline"
    assert wandb_mode({}, wandb_host) is None
    assert wandb_mode({"WANDB_API_KEY": "k"}, missing) is None
    assert wandb_mode({"WANDB_MODE": "online"}, missing) is None  # the user's choice stands
    assert wandb_mode({"WANDB_MODE": "disabled"}, missing) is None
    assert wandb_mode({"NETRC": str(wandb_host)}) is None  # NETRC names the file, as for wandb itself
    # a self-hosted server is looked up under its own host
    assert not wandb_api_key_available({"WANDB_BASE_URL": "https://wandb.example.com"}, wandb_host)
    own = tmp_path / "own.netrc"
    own.write_text("machine wandb.example.com login user password k\n")
    assert wandb_api_key_available({"WANDB_BASE_URL": "https://wandb.example.com"}, own)


def _wandb_records(path):
    """The records of a .wandb file: W&B's header, then a LevelDB-style log of 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    position, pending, records = 7, b"", []
    while position + header <= len(data):
        left_in_block = block - position % block
        if left_in_block < header:
            position += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + header])
        position += header
        if kind == 0:  # zero padding to the end of the block
            position += left_in_block - header
            continue
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):  # FULL or LAST chunk
            message = wandb_internal_pb2.Record()
            message.ParseFromString(pending)
            records.append(message)
            pending = b""
    return records


def test_offline_wandb_run_holds_the_logged_values(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    save_dir = tmp_path / "wandb-save"

    writers = open_writers(log_json=None, tensorboard_dir=None, wandb_project="megalith-test",
                           wandb_exp_name="offline-run", wandb_save_dir=str(save_dir),
                           run_config={"seq_length": 128, "lr": 0.001})
    for rec in RECORDS:
        writers.write(rec, rec["iteration"])
    writers.close()
    # wandb's service and threads are gone, so this process can still fork ranks safely
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("wandb", "Otel"))]

    printed = capsys.readouterr().out.strip().splitlines()
    offline_lines = [line for line in printed if "logging offline" in line]
    assert len(offline_lines) == 1
    run_files = list(save_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list(save_dir.rglob("*"))
    assert f"wandb sync {run_files[0].parent}" in offline_lines[0]

    records = _wandb_records(run_files[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "megalith-test" and runs[0].display_name == "offline-run"
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in runs[0].config.update}
    assert config["seq_length"] == 128 and config["lr"] == 0.001
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            # wandb stores a key either as `key` or as a one-element `nested_key`
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[r.history.step.num] = items
    assert sorted(history) == [10, 20, 30]
    assert [history[step]["_step"] for step in (10, 20, 30)] == [10, 20, 30]
    assert [history[step]["lm loss"] for step in (10, 20, 30)] == [7.25, 6.5, 5.75]
    assert [history[step].get("grad-norm") for step in (10, 20, 30)] == [1.5, None, 0.5]
    assert history[30]["iteration-time"] == pytest.approx(0.28)
    assert history[20]["samples vs steps"] == 160


# --- progress bar ---


def test_progress_bar_is_silent_when_stdout_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # like a log file: no isatty
    bar = progress.progress_bar(total=100, initial=10)
    assert isinstance(bar, progress.NullProgressBar)
    bar.update(5)
    bar.set_postfix(loss=1.0)
    bar.write("a log line")
    bar.close()
    assert sys.stdout.getvalue() == "a log line\n"


def test_progress_bar_is_tqdm_when_enabled(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar = progress.progress_bar(total=100, initial=10, enabled=True)
    assert not isinstance(bar, progress.NullProgressBar)
    bar.update(5)
    bar.set_postfix(loss=1.25)
    bar.write("a log line")
    bar.close()
    text = out.getvalue()
    assert "15/100" in text and "loss=1.25" in text and "a log line\n" in text


def test_progress_bar_follows_isatty(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    bar = progress.progress_bar(total=3, initial=0)
    assert not isinstance(bar, progress.NullProgressBar)
    bar.close()
    assert progress.progress_bar(total=3, initial=0, enabled=False).__class__ is progress.NullProgressBar
