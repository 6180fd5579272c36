"""The dedup settings every tier reads, resolved once from the spec (`DedupConfig.from_spec`) or built by
`genrun dedup` from its flags: the merge, the generators' online check and the dedup tool read this one object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from genrun.contract.api import DedupSpec


@dataclass(frozen=True)
class SemanticConfig:
    """The semantic tier's model, cosine threshold and embedding batch size."""

    model: str
    threshold: float
    batch_size: int


@dataclass(frozen=True)
class DedupConfig:
    """key: what exact and near compare (the instruction, or instruction and response); normalize: compare
    normalised keys; online: the generators skip what the tiers find before spending response tokens; near: the
    MinHash LSH tier (Jaccard `threshold`, `num_perm` permutations, shingles of `shingle_size` words); partitions:
    the round's near-tier work split over map/reduce Jobs; semantic: the semantic tier, None when off; against:
    earlier datasets or runs treated as already seen."""

    key: Literal["instruction", "pair"] = "instruction"
    normalize: bool = True
    online: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 1
    partitions: int = 1
    semantic: SemanticConfig | None = None
    against: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, d: DedupSpec) -> DedupConfig:
        sem = d.semantic
        return cls(
            key=d.key,
            normalize=d.normalize,
            online=d.online,
            near=d.near_duplicates,
            threshold=d.threshold,
            num_perm=d.num_perm,
            shingle_size=d.shingle_size,
            partitions=d.partitions,
            semantic=SemanticConfig(sem.model, sem.threshold, sem.batch_size) if sem.enabled else None,
            against=tuple(d.against),
        )

    def without_semantic(self) -> DedupConfig:
        """The exact and near tiers only (the semantic tier off)."""
        from dataclasses import replace

        return replace(self, semantic=None)

    def params(self) -> dict[str, Any]:
        """What the merge's stored state depends on: a change means the state cannot be extended, only rebuilt."""
        from genrun.worker.dedup import lsh_params

        sem = self.semantic
        return {
            "semantic": None if sem is None else {"model": sem.model, "threshold": sem.threshold},
            "key": self.key, "normalize": self.normalize, "near": self.near, "threshold": self.threshold,
            "num_perm": self.num_perm, "shingle_size": self.shingle_size,
            "lsh": list(lsh_params(self.threshold, self.num_perm)),
            "key_hash": "xxh3_64", "minhash_seed": 1, "near_rule": "keep-first-kept",
            "against": list(self.against),  # round 0 is these sources: another list means another state
        }  # fmt: skip
