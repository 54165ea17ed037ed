"""A served model's versions, and which of them answers a request.

A model name has one or more versions, each its own `ModelHost` (checkpoint, queue, batches).
A request that names a version gets that one. One that names none gets a version drawn in
proportion to the weights: a canary at weight 5 beside 95 answers about one request in twenty.
With a client id (the `X-Client-Id` header, or gRPC metadata) the draw comes from a hash of the
id instead, so a client keeps its version while the weights stay. The newest version takes the
lowest hashes, so a client moved to it by a growing weight is not moved back.
"""

from __future__ import annotations

import hashlib
import random

from .errors import ModelNotFound, Overloaded
from .host import ModelHost


class ServedModel:
    """One model name: its versions' hosts and the traffic weights between them."""

    def __init__(self, name: str, hosts: dict[str, ModelHost], weights: dict[str, float]):
        tasks = {host.meta.task for host in hosts.values()}
        if len(tasks) != 1:
            raise ValueError(f"model {name!r}: its versions must share a task, not {sorted(tasks)}")
        self.name, self.hosts, self.weights = name, hosts, weights
        self.task = next(iter(hosts.values())).task
        self.meta = next(iter(hosts.values())).meta
        # newest first: its share of [0, 1) starts at 0 and grows with its weight
        self._draw = sorted(
            ((v, w) for v, w in weights.items() if w > 0), key=lambda vw: -int(vw[0])
        )
        self._total = sum(w for _, w in self._draw)

    def numbers(self) -> list[str]:
        """Its versions, oldest first."""
        return sorted(self.hosts, key=int)

    def version(self, version: str) -> ModelHost:
        host = self.hosts.get(version)
        if host is None:
            raise ModelNotFound(
                f"model {self.name!r} has no version {version!r}; it has {self.numbers()}"
            )
        return host

    def choose(self, client: str | None = None) -> ModelHost:
        """The version for a request that names none: drawn by weight (from the client id's
        hash, where given)."""
        point = (_fraction(client) if client else random.random()) * self._total
        for version, weight in self._draw:
            point -= weight
            if point < 0:
                return self.hosts[version]
        return self.hosts[self._draw[-1][0]]

    def full(self) -> bool:
        """Whether every version that takes unnamed traffic has a full line."""
        return all(self.hosts[v].full() for v, _ in self._draw)

    def overloaded(self) -> Overloaded:
        """The refusal when it is `full`: its versions' lines are."""
        retry_after_s = next(iter(self.hosts.values())).retry_after_s
        return Overloaded(f"model {self.name!r} has a full queue", retry_after_s)


def _fraction(client: str) -> float:
    """A point in [0, 1) from a client id, the same in every replica and process."""
    digest = hashlib.blake2b(client.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
