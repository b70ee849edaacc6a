"""Where the per-iteration metrics go besides the log line: JSON lines, TensorBoard, Weights & Biases.

Only the last rank (the one that prints the log line, as in Megatron) opens these. Each writer
takes the record of `log_line.as_json_record` (plus any extra numeric fields) and the iteration.
TensorBoard and W&B get Megatron's scalar names ("lm loss", "learning-rate", "grad-norm",
"loss-scale", "batch-size", "iteration-time" in seconds, "throughput" in TFLOP/s per device), so
dashboards built for Megatron runs show ours; tokens/s, skipped and nan counts are our additions.
Validation goes in as "lm loss validation", with "lm loss validation ppl" on TensorBoard only under
--log-validation-ppl-to-tensorboard, as in Megatron.

TensorBoard writes the training scalars of a log line whose iteration is a multiple of
--tensorboard-log-interval (the log line's numbers: means over the log interval), validation
whenever it runs, and the TensorBoard-only scalars of `write_tensorboard` (memory, timers; see
megalith.training.housekeeping) on the same iterations as the training scalars.

TensorBoard and wandb are optional packages, imported only when asked for. wandb never stops to
ask for a login: without an API key it runs offline (no network at all) and says how to upload
the run later with `wandb sync`.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import urlparse

from megalith.errors import ConfigError

# record key -> (Megatron's scalar name, factor applied to the value)
_SCALAR_NAMES: dict[str, tuple[str, float]] = {
    "lm_loss": ("lm loss", 1.0),
    "lr": ("learning-rate", 1.0),
    "global_batch_size": ("batch-size", 1.0),
    "loss_scale": ("loss-scale", 1.0),
    "grad_norm": ("grad-norm", 1.0),
    "elapsed_ms": ("iteration-time", 1e-3),  # Megatron logs seconds per iteration
    "tflops_per_device": ("throughput", 1.0),
    "tokens_per_s": ("tokens-per-second", 1.0),
    "skipped": ("num-skipped-iterations", 1.0),
    "nan_iterations": ("num-nan-iterations", 1.0),
    "consumed_samples": ("samples vs steps", 1.0),
    "validation_lm_loss": ("lm loss validation", 1.0),
    "validation_lm_loss_ppl": ("lm loss validation ppl", 1.0),
}
VALIDATION_KEY = "validation_lm_loss"  # what marks a validation record
_VALIDATION_PPL = "lm loss validation ppl"
_NOT_SCALARS = {"iteration", "train_iters", "timestamp"}
# Megatron also plots these against consumed samples on TensorBoard ("lm loss vs samples").
_VS_SAMPLES = ("lm loss", "learning-rate", "batch-size", "loss-scale", "grad-norm")


def scalars_for(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numbers under Megatron's TensorBoard/W&B names; None, text and bools are left out,
    and fields without a Megatron name keep their own."""
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name, factor = _SCALAR_NAMES.get(key, (key, 1.0))
        scalars[name] = value * factor if factor != 1.0 else value
    return scalars


class MetricsWriter(Protocol):
    def write(self, record: Mapping[str, Any], iteration: int) -> None: ...

    def close(self) -> None: ...


def _unwritable(flag: str, path: Path, exc: OSError) -> ConfigError:
    reason = exc.strerror or type(exc).__name__
    return ConfigError(f"{flag} {path}: cannot write there ({reason}); choose a writable location")


class JsonLinesWriter:
    """--log-json PATH: one JSON object per logged iteration, flushed at once so a crash loses nothing.

    The file is appended to, so a resumed run continues its own history. Non-finite numbers are
    written as NaN/Infinity (Python's json reads them back; strict parsers may not).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(
                f"--log-json {self.path} is a directory; give a file path such as {self.path / 'metrics.jsonl'}"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise _unwritable("--log-json", self.path, exc) from None

    def write(self, record: Mapping[str, Any], iteration: int) -> None:
        line = {"iteration": iteration, **record} if "iteration" not in record else dict(record)
        self._file.write(json.dumps(line, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class TensorBoardWriter:
    """--tensorboard-dir DIR: scalars at global step = iteration, the run's config as text once.

    `log_interval` is --tensorboard-log-interval; `validation_ppl` is --log-validation-ppl-to-tensorboard.
    """

    def __init__(self, log_dir: str | os.PathLike, run_config: Mapping[str, Any] | None = None, *,
                 log_interval: int = 1, validation_ppl: bool = False) -> None:
        self.log_interval, self.validation_ppl = log_interval, validation_ppl
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard-dir needs the tensorboard package (a megalith dependency); pip install tensorboard"
            ) from None
        self.log_dir = Path(log_dir)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        except OSError as exc:
            raise _unwritable("--tensorboard-dir", self.log_dir, exc) from None
        for key, value in (run_config or {}).items():  # as Megatron's write_args_to_tensorboard
            self._writer.add_text(str(key), str(value), global_step=0)
        self._writer.flush()

    def write(self, record: Mapping[str, Any], iteration: int) -> None:
        validation = VALIDATION_KEY in record
        if not validation and iteration % self.log_interval:
            return
        scalars = scalars_for(record)
        if validation and not self.validation_ppl:
            scalars.pop(_VALIDATION_PPL, None)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=iteration)
        samples = record.get("consumed_samples")
        if isinstance(samples, int):
            for name in _VS_SAMPLES:
                if name in scalars:
                    self._writer.add_scalar(f"{name} vs samples", scalars[name], global_step=samples)
        self._writer.flush()

    def write_scalars(self, scalars: Mapping[str, float], iteration: int) -> None:
        """TensorBoard-only scalars under their own names, on the training scalars' iterations."""
        if iteration % self.log_interval or not scalars:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=iteration)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_api_key_available(environ: Mapping[str, str], netrc_path: str | os.PathLike | None = None) -> bool:
    """True when wandb could log in without asking: WANDB_API_KEY, or a netrc entry for its host."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if netrc_path is None:
        netrc_path = environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(str(netrc_path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(environ: Mapping[str, str], netrc_path: str | os.PathLike | None = None) -> str | None:
    """"offline" when wandb would otherwise stop to ask for a login; None (wandb decides) when
    WANDB_MODE is set or a key is available."""
    if environ.get("WANDB_MODE"):
        return None
    return None if wandb_api_key_available(environ, netrc_path) else "offline"


class WandbWriter:
    """--wandb-project P: one W&B run named --wandb-exp-name under --wandb-save-dir, config logged once."""

    def __init__(
        self,
        project: str,
        exp_name: str,
        save_dir: str | os.PathLike | None,
        run_config: Mapping[str, Any] | None = None,
        *,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb-project needs the wandb package (a megalith dependency); pip install wandb") from None
        if save_dir is not None:
            try:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _unwritable("--wandb-save-dir", Path(save_dir), exc) from None
        mode = wandb_mode(os.environ)
        offline = mode == "offline" or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
        if offline:
            # process-wide too, or wandb's own usage telemetry still tries to reach its server
            wandb.setup(settings=wandb.Settings(mode="offline"))
        settings = wandb.Settings(
            console="off",  # leave stdout alone: the log line and the progress bar own it
            x_disable_stats=True,  # no system-metrics sampler (nor its cloud-metadata probes)
            x_disable_machine_info=True,
            disable_git=True,
            save_code=False,
            disable_job_creation=True,
            silent=offline,  # we print the one line that matters ourselves
        )
        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            name=exp_name,
            dir=None if save_dir is None else str(save_dir),
            config=dict(run_config or {}),
            mode=mode,
            settings=settings,
        )
        self.run_dir = Path(self._run.sync_dir) if getattr(self._run, "sync_dir", None) else None
        if offline:
            reason = "WANDB_MODE=offline" if mode is None else "no API key (WANDB_API_KEY or an api.wandb.ai entry in ~/.netrc)"
            print_fn(
                f"wandb: {reason}, so logging offline "
                f"to {self.run_dir}; upload it later with `wandb sync {self.run_dir}`"
            )

    def write(self, record: Mapping[str, Any], iteration: int) -> None:
        self._run.log(scalars_for(record), step=iteration)

    def close(self) -> None:
        self._run.finish()
        self._wandb.teardown()  # stop wandb's service process and threads: the run is over


class MetricsWriters:
    """Every writer this run asked for, written and closed together (none: all calls do nothing)."""

    def __init__(self, writers: list[MetricsWriter] | None = None) -> None:
        self.writers = list(writers or [])

    def __bool__(self) -> bool:
        return bool(self.writers)

    def __enter__(self) -> "MetricsWriters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, record: Mapping[str, Any], iteration: int) -> None:
        for writer in self.writers:
            writer.write(record, iteration)

    def write_tensorboard(self, scalars: Mapping[str, float], iteration: int) -> None:
        """Scalars only TensorBoard plots (the others have no such method and skip them)."""
        for writer in self.writers:
            if hasattr(writer, "write_scalars"):
                writer.write_scalars(scalars, iteration)

    def close(self) -> None:
        errors = []
        for writer in self.writers:
            try:
                writer.close()
            except Exception as exc:  # close the others before reporting
                errors.append(exc)
        self.writers = []
        if errors:
            raise errors[0]


def open_writers(
    *,
    log_json: str | None,
    tensorboard_dir: str | None,
    wandb_project: str | None,
    wandb_exp_name: str | None,
    wandb_save_dir: str | None,
    run_config: dict,
    tensorboard_log_interval: int = 1,
    log_validation_ppl_to_tensorboard: bool = False,
) -> MetricsWriters:
    """The writers the flags ask for; call on the last rank only. An empty --wandb-project means no
    W&B (Megatron's default), and a W&B run needs --wandb-exp-name (as in Megatron)."""
    if wandb_project and not wandb_exp_name:
        raise ConfigError(
            f"--wandb-project {wandb_project} needs --wandb-exp-name; add --wandb-exp-name NAME for the run"
        )
    writers: list[MetricsWriter] = []
    try:
        if log_json:
            writers.append(JsonLinesWriter(log_json))
        if tensorboard_dir:
            writers.append(TensorBoardWriter(tensorboard_dir, run_config, log_interval=tensorboard_log_interval,
                                             validation_ppl=log_validation_ppl_to_tensorboard))
        if wandb_project:
            writers.append(WandbWriter(wandb_project, wandb_exp_name, wandb_save_dir, run_config))
    except BaseException:
        MetricsWriters(writers).close()
        raise
    return MetricsWriters(writers)

