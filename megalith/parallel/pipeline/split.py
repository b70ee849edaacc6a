"""Which layers each pipeline stage holds (pure).

Layers are split evenly over the pp * vpp global stages (chunk c of rank r is stage c*pp + r).
Megatron's `--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers` give the
first and last global stage their own counts; the rest are split evenly over the stages in
between. A split that does not add up is an error, never a silently dropped layer.
"""

from __future__ import annotations

from megalith.errors import ConfigError


def split_layers(
    num_layers: int, pp: int, vpp: int = 1, first: int | None = None, last: int | None = None
) -> list[list[int]]:
    """Global layer indices of every global stage, in stage order."""
    stages = pp * vpp
    if vpp > 1 and pp == 1:
        raise ConfigError(
            f"virtual pipeline stages ({vpp}) need a pipeline: set --pipeline-model-parallel-size > 1 or drop vpp"
        )
    counts = [None] * stages
    if first is not None:
        counts[0] = first
    if last is not None:
        if stages == 1 and first is not None and first != last:
            raise ConfigError(f"one stage cannot hold both {first} and {last} layers; give one of the two")
        counts[-1] = last
    fixed = sum(c for c in counts if c is not None)
    free = [i for i, c in enumerate(counts) if c is None]
    rest = num_layers - fixed
    if any(c is not None and c < 0 for c in counts) or rest < 0:
        raise ConfigError(
            f"first/last stage layers ({first}, {last}) exceed the {num_layers} layers; lower them"
        )
    if free:
        if rest % len(free) != 0:
            what = "uneven first/last stages leave" if fixed else "there are"
            raise ConfigError(
                f"{num_layers} layers do not split evenly over {stages} pipeline stages (pp {pp} x vpp {vpp}): "
                f"{what} {rest} layers for {len(free)} stages; choose num_layers, pp and vpp so that they divide"
            )
        for i in free:
            counts[i] = rest // len(free)
    elif rest != 0:
        raise ConfigError(
            f"first/last stage layers ({first}, {last}) add up to {fixed}, not the {num_layers} layers; make them add up"
        )
    out, start = [], 0
    for count in counts:
        out.append(list(range(start, start + count)))
        start += count
    return out
