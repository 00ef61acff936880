"""A KServe v2 repository index as the client and the load test read it (Triton's, or the gateway's).

No import from the `cli` package: the load test's Locust users read it too, and under Locust `cli` is
loadtest/cli.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# What Triton's index means by a model with no state and no reason.
NOT_LOADED = "not loaded (a Triton in explicit model control mode serves only the models it was told to load)"


@dataclass(frozen=True)
class ModelIndex:
    """A KServe v2 repository index: the names READY, and why each other one is not. Triton lists every model of
    its repository, loaded or not (in explicit model control mode only the ones it was told to load are READY,
    the others carry no state); the gateway lists its models UNAVAILABLE, with the reason, while not ready."""

    ready: list[str]
    not_ready: dict[str, str]

    @classmethod
    def of(cls, index) -> ModelIndex:
        """From tritonclient.http's list of dicts or tritonclient.grpc's RepositoryIndexResponse."""
        entries = index if isinstance(index, list) else index.models
        ready, not_ready = [], {}
        for entry in entries:
            name, state, reason = (
                (str(entry["name"]), entry.get("state", ""), entry.get("reason", ""))
                if isinstance(entry, dict)
                else (entry.name, entry.state, entry.reason)
            )
            if state == "READY":
                ready.append(name)
            else:
                not_ready[name] = reason or state or NOT_LOADED
        return cls(ready, not_ready)
