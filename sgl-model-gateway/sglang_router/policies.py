"""Routing policies: given the available workers and the request's routing text, pick one.

- `round_robin`: the next worker in turn.
- `random`: uniformly at random.
- `power_of_two`: two at random, the one with the smaller load.
- `cache_aware`: upstream's approximate-tree policy. Imbalanced pool (max - min load above
  `--balance-abs-threshold` and max above min times `--balance-rel-threshold`): the least loaded
  worker. Otherwise the worker holding the longest prefix of the text if the matched share
  exceeds `--cache-threshold`, else the worker with the smallest tree. The text is recorded under
  the chosen worker either way.

Load is a worker's `Worker.load`: requests in flight through this router plus what its last
`/get_load` reported beyond them.
"""

from __future__ import annotations

import itertools
import random
from typing import Optional

from sglang_router import metrics
from sglang_router.tree import Tree
from sglang_router.workers import Worker


class Policy:
    name = ""
    needs_text = False
    needs_load = False

    def select(self, workers: list[Worker], text: Optional[str]) -> Worker:
        raise NotImplementedError

    def on_remove(self, url: str) -> None:
        """A worker left the pool for good."""


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, workers: list[Worker], text: Optional[str]) -> Worker:
        return workers[next(self._counter) % len(workers)]


class Random(Policy):
    name = "random"

    def select(self, workers: list[Worker], text: Optional[str]) -> Worker:
        return random.choice(workers)


class PowerOfTwo(Policy):
    name = "power_of_two"
    needs_load = True

    def select(self, workers: list[Worker], text: Optional[str]) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = random.sample(workers, 2)
        return a if a.load <= b.load else b


class CacheAware(Policy):
    name = "cache_aware"
    needs_text = True
    needs_load = True

    def __init__(
        self,
        cache_threshold: float,
        balance_abs_threshold: int,
        balance_rel_threshold: float,
        max_tree_size: int,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.abs_threshold = balance_abs_threshold
        self.rel_threshold = balance_rel_threshold
        self.max_tree_size = max_tree_size
        self.tree = Tree()

    def select(self, workers: list[Worker], text: Optional[str]) -> Worker:
        text = text or ""
        loads = [w.load for w in workers]
        hi, lo = max(loads), min(loads)
        metrics.MAX_LOAD.set(hi)
        metrics.MIN_LOAD.set(lo)
        if hi - lo > self.abs_threshold and hi > lo * self.rel_threshold:
            metrics.LOAD_BALANCING_EVENTS.inc()
            chosen = workers[loads.index(lo)]
        else:
            by_url = {w.url: w for w in workers}
            matched, tenant = self.tree.prefix_match(text, by_url)
            if tenant is not None and text and matched / len(text) > self.cache_threshold:
                metrics.CACHE_HITS.inc()
                chosen = by_url[tenant]
            else:
                metrics.CACHE_MISSES.inc()
                chosen = by_url[self.tree.smallest_tenant(by_url) or workers[0].url]
        if text:
            self.tree.insert(text, chosen.url)
        return chosen

    def evict(self) -> None:
        self.tree.evict(self.max_tree_size)
        for url, size in self.tree.tenant_chars.items():
            metrics.TREE_SIZE.labels(url).set(size)

    def on_remove(self, url: str) -> None:
        self.tree.remove_tenant(url)
        try:
            metrics.TREE_SIZE.remove(url)
        except KeyError:  # never evicted, so never reported
            pass


def make_policy(args) -> Policy:
    if args.policy == "cache_aware":
        return CacheAware(
            args.cache_threshold,
            args.balance_abs_threshold,
            args.balance_rel_threshold,
            args.max_tree_size,
        )
    return {"round_robin": RoundRobin, "random": Random, "power_of_two": PowerOfTwo}[args.policy]()
