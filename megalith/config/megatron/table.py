"""The whole compatibility table, and which case (a, b or c) each record is in."""

from __future__ import annotations

from megalith.config.megatron.accepted import ACCEPTED
from megalith.config.megatron.aliases import ALIASES
from megalith.config.megatron.records import MegatronFlag
from megalith.config.megatron.refused_model import (ARCHITECTURE_FLAGS, BIENCODER_FLAGS, HYBRID_FLAGS, RETRO_FLAGS,
                                                    RL_FLAGS, TRAINING_VARIANT_FLAGS, VISION_FLAGS)
from megalith.config.megatron.refused_moe import FP8_FLAGS, INFERENCE_FLAGS, MLA_FLAGS, MOE_FLAGS
from megalith.config.megatron.refused_training import (CHECKPOINT_FLAGS, CONTEXT_PARALLEL_FLAGS, DATA_FLAGS,
                                                       FAULT_TOLERANCE_FLAGS, PIPELINE_FLAGS, TRAINING_FLAGS,
                                                       ZERO_FLAGS)

REFUSED = (MOE_FLAGS + CONTEXT_PARALLEL_FLAGS + FP8_FLAGS + ZERO_FLAGS + FAULT_TOLERANCE_FLAGS + PIPELINE_FLAGS
           + TRAINING_FLAGS + CHECKPOINT_FLAGS + DATA_FLAGS + MLA_FLAGS + ARCHITECTURE_FLAGS + TRAINING_VARIANT_FLAGS
           + HYBRID_FLAGS + RETRO_FLAGS + VISION_FLAGS + BIENCODER_FLAGS + RL_FLAGS + INFERENCE_FLAGS)

# (case, records): a = another spelling of a megalith flag, b = refused away from its default, c = accepted.
CASES = (("a", ALIASES), ("b", REFUSED), ("c", ACCEPTED))
TABLE: tuple[MegatronFlag, ...] = ALIASES + REFUSED + ACCEPTED


def case_of(record: MegatronFlag) -> str:
    """The record's case letter."""
    return next(case for case, records in CASES if record in records)
