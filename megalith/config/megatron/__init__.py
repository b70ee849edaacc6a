"""Megatron-LM's flags that megalith does not implement, as data, and their place on the parser.

- `records`: one flag's record and the owners of refused flags;
- `accepted`, `refused_*`, `aliases`: the table, by topic (case c, case b, case a);
- `table`: the table joined, and each record's case;
- `arguments`: the flags on a parser, the refusal and the notice;
- `docs`: docs/flags.md, generated from the `megalith pretrain` parser.
"""

from megalith.config.megatron.arguments import (accepted_given, add_megatron_compat_arguments, compat_notice,
                                                refuse_unsupported, refused_flags)

__all__ = ["accepted_given", "add_megatron_compat_arguments", "compat_notice", "refuse_unsupported", "refused_flags"]
