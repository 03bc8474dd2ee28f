"""A paged KV cache with a prefix cache, LRU eviction and preemption.

Blocks hold ``block_tokens`` tokens. A prompt's full blocks are identified by
prefix hashes (chained, so block *i* matches only when blocks 0..i match, as
in vLLM's automatic prefix caching). Blocks of finished requests stay cached
until space is needed; then the least recently used unpinned blocks are
evicted. When nothing is evictable, the caller preempts a running request
(recompute): its blocks are released and its work is redone later.

``capacity=None`` is an unbounded cache: the counterfactual "no memory
pressure" used for ground truth.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Eviction:
    """What one allocation had to evict (reported as one ``tailscope.kv.eviction``)."""

    blocks: int
    reason: str  # prefix_lru | capacity | preemption
    usage: float
    victim: int | None = None  # request id


@dataclass
class KVCache:
    capacity: int | None
    block_tokens: int = 16
    used_private: int = 0
    # prefix hash -> refcount; unpinned (refcount 0) ones are also in _lru
    _ref: dict[int, int] = field(default_factory=dict)
    _lru: OrderedDict[int, None] = field(default_factory=OrderedDict)
    evictions: list[Eviction] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.capacity is not None and self.capacity <= 0:
            raise ValueError(f"KV capacity must be > 0 blocks, got {self.capacity}")
        if self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, got {self.block_tokens}")

    # --- accounting ---------------------------------------------------------
    @property
    def used(self) -> int:
        return self.used_private + len(self._ref)

    @property
    def free(self) -> float:
        return float("inf") if self.capacity is None else self.capacity - self.used

    def usage(self) -> float:
        if self.capacity is None:
            return 0.0
        return min(1.0, (self.used_private + sum(1 for r in self._ref.values() if r > 0)) / self.capacity)

    def cached_prefix(self, hashes: tuple[int, ...]) -> int:
        """How many leading blocks of ``hashes`` are resident."""
        n = 0
        for h in hashes:
            if h not in self._ref:
                break
            n += 1
        return n

    # --- allocation -----------------------------------------------------------
    def _evict(self, need: int) -> int:
        """Evict up to ``need`` LRU unpinned prefix blocks; returns how many."""
        n = 0
        while n < need and self._lru:
            h, _ = self._lru.popitem(last=False)
            del self._ref[h]
            n += 1
        return n

    def drop_unpinned(self) -> Eviction | None:
        """Evict every unpinned prefix block (a request needs more than is free)."""
        n = self._evict(len(self._lru))
        if not n:
            return None
        ev = Eviction(blocks=n, reason="capacity", usage=self.usage())
        self.evictions.append(ev)
        return ev

    def can_fit(self, hashes: tuple[int, ...], private: int) -> bool:
        if self.capacity is None:
            return True
        hit = self.cached_prefix(hashes)
        new = len(hashes) - hit + private
        return new <= self.free + len(self._lru) - sum(1 for h in hashes[:hit] if h in self._lru)

    def admit(self, hashes: tuple[int, ...], private: int) -> tuple[int, Eviction | None]:
        """Pin the prompt's prefix blocks (hits and newly filled) and allocate
        ``private`` blocks; returns (blocks hit, eviction made room, if any).
        Call :meth:`can_fit` first."""
        hit = self.cached_prefix(hashes)
        for h in hashes[:hit]:
            if self._ref[h] == 0:
                self._lru.pop(h, None)
            self._ref[h] += 1
        need = len(hashes) - hit + private
        ev = None
        if self.capacity is not None and need > self.free:
            n = self._evict(int(need - self.free))
            if n:
                ev = Eviction(blocks=n, reason="prefix_lru", usage=0.0)
        for h in hashes[hit:]:
            self._ref[h] = self._ref.get(h, 0) + 1
            self._lru.pop(h, None)
        self.used_private += private
        if ev is not None:
            ev.usage = self.usage()
            self.evictions.append(ev)
        return hit, ev

    def grow(self, blocks: int = 1) -> tuple[bool, Eviction | None]:
        """Allocate decode blocks; evicts prefix blocks (reason ``capacity``)
        when full. Returns (ok, eviction); ok False means the caller must preempt."""
        ev = None
        if self.capacity is not None and blocks > self.free:
            n = self._evict(int(blocks - self.free))
            if n:
                ev = Eviction(blocks=n, reason="capacity", usage=0.0)
            if blocks > self.free:
                if ev is not None:
                    ev.usage = self.usage()
                    self.evictions.append(ev)
                return False, ev
        self.used_private += blocks
        if ev is not None:
            ev.usage = self.usage()
            self.evictions.append(ev)
        return True, ev

    def release(self, hashes: tuple[int, ...], private: int) -> None:
        """A request finished or was preempted: unpin its prefix blocks (they
        stay cached, LRU) and free its private blocks."""
        for h in hashes:
            r = self._ref.get(h)
            if r is None:
                continue
            r -= 1
            self._ref[h] = max(r, 0)
            if r <= 0:
                self._lru[h] = None
                self._lru.move_to_end(h)
        self.used_private = max(0, self.used_private - private)
