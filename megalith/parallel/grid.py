"""The rank grid: which coordinates each global rank has, and which ranks share a group.

Pure arithmetic, no process groups, so it can be checked exhaustively on one CPU and the
process-group code can build its groups from it. Ranks follow Megatron's ``tp-cp-dp-pp``
order with tp varying fastest, so a tensor-parallel group is a block of neighbouring ranks
(one node, fast links):

    rank = tp_i + tp * (cp_i + cp * (dp_i + dp * pp_i))

The experts factor the same ranks a second time, as Megatron-Core does (its expert rank
generator, order ``tp-cp-ep-dp-pp`` with cp folded into data parallelism): expert tensor
parallelism etp fastest, then expert parallelism ep, then expert data parallelism
edp = world / (etp * ep * pp), then the same pp, so both factorisations agree on the stage:

    rank = etp_i + etp * (ep_i + ep * (edp_i + edp * pp_i))

With ep 1 and etp = tp the expert groups are the attention ones (etp = tp, edp = dp x cp).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import ClassVar

from megalith.errors import ConfigError

# Which coordinates vary inside one group of each kind; the others are fixed.
_VARIED: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "mp": ("tp", "pp"),
    "dp_cp": ("dp", "cp"),
    "tp_cp": ("tp", "cp"),
}
_DIMS = ("tp", "cp", "dp", "pp")
# The expert factorisation: etp (tensor inside an expert), ep, edp (the experts' data parallelism), pp.
_EXPERT_VARIED: dict[str, tuple[str, ...]] = {
    "ep": ("ep",),
    "etp": ("etp",),
    "edp": ("edp",),
    "etp_ep": ("etp", "ep"),  # Megatron's expert tensor-and-model-parallel group
    "emp": ("etp", "ep", "pp"),  # expert model parallel: every rank holding a different expert shard
}
_EXPERT_DIMS = ("etp", "ep", "edp", "pp")


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits on each parallel axis."""

    tp: int
    cp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class ExpertCoords:
    """Where one rank sits on the experts' axes."""

    etp: int
    ep: int
    edp: int
    pp: int


def _check_size(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}; pass a positive whole number")


@dataclass(frozen=True)
class RankGrid:
    """A world of ranks laid out as tp x cp x dp x pp; ``dp=None`` takes the rest of the world.

    For experts the same ranks are also etp x ep x edp x pp (``etp=None``: etp = tp)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int | None = None
    ep: int = 1
    etp: int | None = None

    ORDER: ClassVar[str] = "tp-cp-dp-pp"
    EXPERT_ORDER: ClassVar[str] = "tp-cp-ep-dp-pp"  # Megatron's name; cp is 1 on the expert side
    GROUP_KINDS: ClassVar[tuple[str, ...]] = ("tp", "cp", "dp", "pp", "mp", "dp_cp", "tp_cp", "embedding")
    EXPERT_GROUP_KINDS: ClassVar[tuple[str, ...]] = tuple(_EXPERT_VARIED)

    def __post_init__(self) -> None:
        _check_size("world_size", self.world_size)
        _check_size("tensor-model-parallel size (tp)", self.tp)
        _check_size("pipeline-model-parallel size (pp)", self.pp)
        _check_size("context-parallel size (cp)", self.cp)
        _check_size("expert-model-parallel size (ep)", self.ep)
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        _check_size("expert-tensor-parallel size (etp)", self.etp)
        self._check_attention_sizes()
        expert = self.etp * self.ep * self.pp  # type: ignore[operator]
        if self.world_size % expert:  # after the attention sizes: their message comes first
            raise ConfigError(
                f"expert-tensor-parallel size {self.etp} x expert-model-parallel {self.ep} x pipeline {self.pp} "
                f"= {expert} does not divide world size {self.world_size}; "
                "choose --expert-tensor-parallel-size and --expert-model-parallel-size whose product with pp divides it"
            )

    def _check_attention_sizes(self) -> None:
        model = self.tp * self.pp * self.cp
        if self.dp is None:
            if self.world_size % model:
                raise ConfigError(
                    f"tensor-model-parallel size {self.tp} x pipeline {self.pp} x context {self.cp} = {model} "
                    f"does not divide world size {self.world_size}; "
                    "choose sizes whose product divides the number of processes"
                )
            object.__setattr__(self, "dp", self.world_size // model)
            return
        _check_size("data-parallel size (dp)", self.dp)
        total = model * self.dp
        if total != self.world_size:
            raise ConfigError(
                f"tensor-model-parallel size {self.tp} x context {self.cp} x data {self.dp} x pipeline {self.pp} "
                f"= {total} does not equal world size {self.world_size}; "
                f"pass dp=None to use the rest of the world, or sizes whose product is {self.world_size}"
            )

    def __str__(self) -> str:
        experts = f".etp{self.etp}.ep{self.ep}.edp{self.edp}" if self.has_expert_axes else ""
        return f"tp{self.tp}.cp{self.cp}.dp{self.dp}.pp{self.pp}{experts} (world {self.world_size})"

    @property
    def edp(self) -> int:
        """The experts' data-parallel size: world / (etp x ep x pp)."""
        return self.world_size // (self.etp * self.ep * self.pp)  # type: ignore[operator]

    @property
    def has_expert_axes(self) -> bool:
        """False when the expert groups are the attention ones (ep 1, etp = tp): nothing new to build."""
        return self.ep > 1 or self.etp != self.tp

    def _expert_sizes(self) -> dict[str, int]:
        return {"etp": self.etp, "ep": self.ep, "edp": self.edp, "pp": self.pp}  # type: ignore[dict-item]

    def expert_coords(self, rank: int) -> ExpertCoords:
        """The (etp, ep, edp, pp) coordinates of a global rank; pp is the same as in `coords`."""
        self.coords(rank)  # checks the rank
        etp_i, rest = rank % self.etp, rank // self.etp  # type: ignore[operator]
        ep_i, rest = rest % self.ep, rest // self.ep
        return ExpertCoords(etp=etp_i, ep=ep_i, edp=rest % self.edp, pp=rest // self.edp)

    def expert_rank_of(self, *, etp: int = 0, ep: int = 0, edp: int = 0, pp: int = 0) -> int:
        """The global rank at the given expert coordinates (the inverse of `expert_coords`)."""
        sizes = self._expert_sizes()
        for name, value in (("etp", etp), ("ep", ep), ("edp", edp), ("pp", pp)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < sizes[name]:
                raise ConfigError(f"{name} coordinate {value!r} is outside {name} size {sizes[name]} of grid {self}; "
                                  f"use 0..{sizes[name] - 1}")
        return etp + self.etp * (ep + self.ep * (edp + self.edp * pp))  # type: ignore[operator]

    def expert_groups(self, kind: str) -> list[list[int]]:
        """Every expert group of that kind (ep, etp, edp, etp_ep, emp), sorted, ordered by first rank."""
        self._check_expert_kind(kind)
        fixed = [d for d in _EXPERT_DIMS if d not in _EXPERT_VARIED[kind]]
        buckets: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            c = self.expert_coords(rank)
            buckets.setdefault(tuple(getattr(c, d) for d in fixed), []).append(rank)
        return list(buckets.values())

    def expert_group_of(self, kind: str, rank: int) -> list[int]:
        """The expert group of that kind holding rank."""
        self._check_expert_kind(kind)
        c = self.expert_coords(rank)
        sizes, varied = self._expert_sizes(), _EXPERT_VARIED[kind]
        members = []
        for values in product(*(range(sizes[d]) for d in varied)):
            at = {d: getattr(c, d) for d in _EXPERT_DIMS} | dict(zip(varied, values))
            members.append(self.expert_rank_of(**at))
        return sorted(members)

    def _check_expert_kind(self, kind: str) -> None:
        if kind not in self.EXPERT_GROUP_KINDS:
            raise ConfigError(f"unknown expert group kind {kind!r}; use one of {', '.join(self.EXPERT_GROUP_KINDS)}")

    def _sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}  # type: ignore[dict-item]

    def coords(self, rank: int) -> RankCoords:
        """The (tp, cp, dp, pp) coordinates of a global rank."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank!r} is outside world of size {self.world_size}; use 0..{self.world_size - 1}")
        tp_i, rest = rank % self.tp, rank // self.tp
        cp_i, rest = rest % self.cp, rest // self.cp
        dp_i, pp_i = rest % self.dp, rest // self.dp  # type: ignore[operator]
        return RankCoords(tp=tp_i, cp=cp_i, dp=dp_i, pp=pp_i)

    def rank_of(self, *, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        """The global rank at the given coordinates (the inverse of `coords`)."""
        sizes = self._sizes()
        for name, value in (("tp", tp), ("cp", cp), ("dp", dp), ("pp", pp)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < sizes[name]:
                raise ConfigError(
                    f"{name} coordinate {value!r} is outside {name} size {sizes[name]} of grid {self}; "
                    f"use 0..{sizes[name] - 1}"
                )
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))  # type: ignore[operator]

    def _check_kind(self, kind: str) -> None:
        if kind not in self.GROUP_KINDS:
            raise ConfigError(f"unknown group kind {kind!r}; use one of {', '.join(self.GROUP_KINDS)}")

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of that kind, each a sorted list of ranks, ordered by first rank."""
        self._check_kind(kind)
        if kind == "embedding":
            return [self._embedding_of(pipeline) for pipeline in self.groups("pp")]
        fixed = [d for d in _DIMS if d not in _VARIED[kind]]
        buckets: dict[tuple[int, ...], list[int]] = {}
        # Ranks arrive in increasing order, so each group is sorted and the dict keeps groups
        # in order of their first rank.
        for rank in range(self.world_size):
            c = self.coords(rank)
            buckets.setdefault(tuple(getattr(c, d) for d in fixed), []).append(rank)
        return list(buckets.values())

    def group_of(self, kind: str, rank: int) -> list[int] | None:
        """The group of that kind holding rank; None only for an embedding group it is not in."""
        self._check_kind(kind)
        c = self.coords(rank)
        if kind == "embedding":
            group = self._embedding_of(self.group_of("pp", rank))  # type: ignore[arg-type]
            return group if rank in group else None
        sizes = self._sizes()
        varied = _VARIED[kind]
        members = []
        for values in product(*(range(sizes[d]) for d in varied)):
            at = {d: getattr(c, d) for d in _DIMS} | dict(zip(varied, values))
            members.append(self.rank_of(**at))
        return sorted(members)

    @staticmethod
    def _embedding_of(pipeline: list[int]) -> list[int]:
        """First and last stage of one pipeline: they hold the tied input/output embeddings."""
        return [pipeline[0], pipeline[-1]] if len(pipeline) > 1 else [pipeline[0]]
