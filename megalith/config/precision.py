"""The mixed-precision section: bf16 / fp16 parameters and fp16's loss scaling."""

from __future__ import annotations

from dataclasses import dataclass

from megalith.config.flags import flag_field
from megalith.errors import ConfigError
from megalith.training.loss_scaler import ConstantLossScaler, DynamicLossScaler, make_loss_scaler


@dataclass(frozen=True)
class PrecisionConfig:
    """bf16 / fp16 parameters and fp16's loss scaling (group "mixed precision")."""

    bf16: bool = flag_field(False, "bf16 parameters, fp32 main weights and gradient reduction")
    fp16: bool = flag_field(False, "fp16 parameters with loss scaling, fp32 main weights")
    loss_scale: float | None = flag_field(None, "static fp16 loss scale (None: dynamic)")
    initial_loss_scale: float = flag_field(2.0**32, "first dynamic loss scale")
    min_loss_scale: float = flag_field(1.0, "floor of the dynamic loss scale")
    loss_scale_window: int = flag_field(1000, "clean steps before the dynamic scale doubles")
    hysteresis: int = flag_field(2, "overflows tolerated before the dynamic scale halves")

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are both set; choose one")
        # The scalers own the rules on their numbers; building them checks every flag once.
        if self.loss_scale is not None:
            ConstantLossScaler(self.loss_scale)
        DynamicLossScaler(initial_scale=self.initial_loss_scale, min_scale=self.min_loss_scale,
                          growth_interval=self.loss_scale_window, hysteresis=self.hysteresis)

    @property
    def params_dtype(self) -> str:
        """The model's parameter dtype these flags ask for (ModelConfig's spelling)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def make_loss_scaler(self) -> ConstantLossScaler | DynamicLossScaler | None:
        """fp16's scaler (static with --loss-scale, else dynamic); None for bf16 and fp32."""
        return make_loss_scaler(fp16=self.fp16, loss_scale=self.loss_scale, initial_loss_scale=self.initial_loss_scale,
                                min_loss_scale=self.min_loss_scale, loss_scale_window=self.loss_scale_window,
                                hysteresis=self.hysteresis)
