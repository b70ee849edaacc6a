"""Megatron spellings of flags megalith implements (case a): each gives its value to megalith's flag.

An alias whose target flag a command lacks is not added to that command.
"""

from __future__ import annotations

from megalith.config.megatron.records import AliasTarget, flag

ALIASES = (
    flag("--recompute-activations", "true", False, "selective recompute (core attention)",
         AliasTarget("--recompute-granularity", "selective")),
    flag("--use-rotary-position-embeddings", "true", False, "rotary position embeddings (deprecated spelling)",
         AliasTarget("--position-embedding-type", "rope")),
    flag("--use-flash-attn", "true", False, "flash attention (older spelling of --attention-backend flash)",
         AliasTarget("--attention-backend", "flash")),
    flag("--persistent-save-interval", "int", None, "Megatron's second name of --save-interval",
         AliasTarget("--save-interval")),
    flag(("--override-opt_param-scheduler", "--override-lr-scheduler"), "true", False, "Megatron's other spellings "
         "of --override-opt-param-scheduler", AliasTarget("--override-opt-param-scheduler")),
)
