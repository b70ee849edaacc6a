"""fp16 loss scaling with Megatron's rules: a constant scale, or a dynamic one.

fp16 gradients underflow to zero unless the loss is multiplied by a large scale before
backward (and the gradients divided by it after). Too large a scale overflows to inf/nan; then
the step is skipped and the scale shrinks. The dynamic scaler (Megatron's DynamicGradScaler):

- after `growth_interval` (`--loss-scale-window`) clean steps in a row, the scale grows by
  `growth_factor` (2x);
- on an overflow, the scale shrinks by `backoff_factor` (0.5x), never below `min_scale`
  (`--min-loss-scale`), but only once the *hysteresis* budget is used up. With `--hysteresis 2`
  the first overflow only spends the budget and keeps the scale (a single spike does not halve
  it); the second overflow halves it, and so does every further overflow until the scale next
  grows, which refills the budget. Clean steps alone do not refill it.

The scale is a plain Python float: every rank updates it with the same agreed overflow flag, so
every rank holds the same value without a tensor or a collective. bf16 and fp32 need no scaling.
"""

from __future__ import annotations

from typing import Any

from megalith.errors import ConfigError


class ConstantLossScaler:
    """A fixed scale (`--loss-scale S`): overflowing steps are skipped, the scale never moves."""

    def __init__(self, scale: float) -> None:
        if not scale > 0:
            raise ConfigError(f"--loss-scale must be positive, got {scale}; or leave it out for dynamic loss scaling")
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        """Nothing to adapt: a static scale stays what the user chose."""

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep this run's --loss-scale: a static scale is a flag, not training state (as in Megatron)."""


class DynamicLossScaler:
    """Megatron's dynamic scaler: grow after a clean window, back off (with hysteresis) on overflow."""

    def __init__(
        self,
        initial_scale: float = 2.0**32,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ) -> None:
        if not initial_scale > 0:
            raise ConfigError(f"--initial-loss-scale must be positive, got {initial_scale}")
        if not 0 < min_scale <= initial_scale:
            raise ConfigError(
                f"--min-loss-scale {min_scale} must be positive and at most --initial-loss-scale {initial_scale}"
            )
        if not growth_factor > 1:
            raise ConfigError(f"loss-scale growth factor must be above 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ConfigError(f"loss-scale backoff factor must lie strictly between 0 and 1, got {backoff_factor}")
        if growth_interval < 1:
            raise ConfigError(f"--loss-scale-window must be at least 1, got {growth_interval}")
        if hysteresis < 1:
            raise ConfigError(f"--hysteresis must be at least 1, got {hysteresis}")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self._scale = float(initial_scale)
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        """Adapt the scale after a step; `found_inf` must be the flag all ranks agreed on."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the scale and both trackers (a 0-d tensor scale, as Megatron saves it, works too)."""
        missing = [key for key in ("scale", "growth_tracker", "hysteresis_tracker") if key not in state]
        if missing:
            raise ConfigError(
                f"the checkpoint's loss-scaler state lacks {', '.join(missing)}; it is not a dynamic scaler"
            )
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


def make_loss_scaler(
    *,
    fp16: bool,
    loss_scale: float | None,
    initial_loss_scale: float = 2.0**32,
    min_loss_scale: float = 1.0,
    loss_scale_window: int = 1000,
    hysteresis: int = 2,
) -> ConstantLossScaler | DynamicLossScaler | None:
    """The scaler Megatron's flags ask for: constant with `--loss-scale`, else dynamic; None unless fp16.

    As in Megatron, the loss-scale flags are ignored without `--fp16`, so a launch script that
    passes them for a bf16 run still works.
    """
    if not fp16:
        return None
    if loss_scale is not None:
        return ConstantLossScaler(loss_scale)
    return DynamicLossScaler(
        initial_scale=initial_loss_scale,
        min_scale=min_loss_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=loss_scale_window,
        hysteresis=hysteresis,
    )
