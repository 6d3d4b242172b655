"""Alerts to an HTTP endpoint: POST with a timeout, retries with backoff, then give up loudly.

A 2xx is delivered. 5xx, 429, a timeout or no connection are retried ``retries`` times, the wait
doubling from ``backoff_s``. Any other 4xx is permanent (retrying cannot help). What is not
delivered is returned as a reason, which the worker sends to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from stream.settings import WebhookConfig

log = logging.getLogger(__name__)


class WebhookSink:
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.delivered = 0
        self.failed = 0

    async def deliver(self, body: bytes) -> str | None:
        """POST one alert; None when delivered, else why not."""
        headers = {"Content-Type": "application/json", **self.config.headers}
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        delay = self.config.backoff_s
        reason = "not attempted"
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for attempt in range(self.config.retries + 1):
                if attempt:
                    await asyncio.sleep(delay)
                    delay *= 2
                try:
                    async with session.post(self.config.url, data=body, headers=headers) as response:
                        if 200 <= response.status < 300:
                            self.delivered += 1
                            return None
                        reason = f"HTTP {response.status} from {self.config.url}"
                        if response.status != 429 and response.status < 500:
                            break  # permanent
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    reason = f"{type(exc).__name__} posting to {self.config.url}: {exc}"
                log.warning("webhook: attempt %d of %d failed: %s", attempt + 1, self.config.retries + 1, reason)
        self.failed += 1
        return reason
