"""What a delivery needs from the settings, read afresh before each pass and each session.

Settings.fresh() is one cheap check (PRAGMA data_version, appliance/settings.py), so a change made by
the console or the CLI is in force for the next message without any timer; only the DNS resolver is
kept between reads, and made again when its setting changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.queue.resolver import make_async_resolver
from appliance.queue.retry import RetryPolicy
from appliance.queue.smarthost import Smarthost

if TYPE_CHECKING:
    import dns.asyncresolver

    from appliance.settings import Settings


@dataclass(frozen=True)
class DeliveryConfig:
    """Everything a delivery needs from the settings at one moment."""

    policy: RetryPolicy
    port: int
    smarthost: Smarthost | None
    resolver: dns.asyncresolver.Resolver
    hold: bool
    smarthost_error: str = ""
    # No dns_resolver setting: a relay is found as any program finds a host (/etc/hosts too).
    system_resolver: bool = True


class DeliveryConfigs:
    def __init__(self, settings: Settings, default_policy: RetryPolicy) -> None:
        self._settings = settings
        self._default_policy = default_policy
        self._resolver_key: str | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None

    async def current(self) -> DeliveryConfig:
        """The settings in force now, whoever changed them last (this process or the CLI)."""
        values = await self._settings.fresh()
        if self._resolver is None or values.dns_resolver != self._resolver_key:
            self._resolver, self._resolver_key = make_async_resolver(values.dns_resolver), values.dns_resolver
        smarthost_error = f"the relay setting is invalid: {values.relay_problem}" if values.relay_problem else ""
        return DeliveryConfig(values.retry.apply(self._default_policy), values.mx_port, values.relay,
                              self._resolver, values.hold, smarthost_error, values.dns_resolver is None)


def route(config: DeliveryConfig) -> tuple[object, ...]:
    """What an open session depends on: the same route lets it carry the next message."""
    return (config.smarthost, config.port, config.smarthost_error)
