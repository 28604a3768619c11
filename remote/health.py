"""Active health probes of a pool's upstreams (`{TIER}_UPSTREAM_HEALTH_INTERVAL`, off at 0).

Every interval a daemon thread asks each upstream's health route (`{TIER}_UPSTREAM_HEALTH_PATH`,
`/health` beside the base URL's `/v1`, as vLLM, SGLang, llama-server, TEI and llmservice serve it)
and tells the pool its verdict; an unhealthy upstream is not picked until a probe passes. Passive
faults (breakers) still apply between probes: a probe only adds what a request cannot learn cheaply.

Unhealthy: no answer, a 5xx (llama-server answers 503 while it loads its model), or an llmservice
upstream whose tier serving our model is `failed`. Any other answer is healthy, a 404 included: an
upstream without a health route is judged by its requests alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

import httpx

from remote.pool import Pool, Upstream

log = logging.getLogger("llmservice.remote")
PROBE_TIMEOUT_S = 5.0


def health_url(upstream: Upstream, path: str) -> str:
    """The health route beside the base URL: `http://gpu1:8000/v1` + `/health` -> `http://gpu1:8000/health`."""
    base = upstream.url.removesuffix("/v1") if path.startswith("/") else upstream.url
    return f"{base.rstrip('/')}/{path.lstrip('/')}"


def verdict(response: httpx.Response, model: str | None) -> str:
    """Why the answer says the upstream is unhealthy; empty when it is healthy."""
    if response.status_code >= 500:
        return f"health route answered {response.status_code}"
    if response.status_code != 200:
        return ""
    try:
        body = response.json()
    except ValueError:
        return ""
    tiers = body.get("tiers") if isinstance(body, dict) else None
    if not isinstance(tiers, dict):
        return ""
    for name, tier in tiers.items():  # an llmservice upstream: its tier for our model
        if isinstance(tier, dict) and model and model in (name, tier.get("model")) and tier.get("state") == "failed":
            return f"its {name} tier failed: {str(tier.get('reason') or '')[:200]}".rstrip(": ")
    return ""


class HealthProber:
    """Probes every upstream of `pool` each `interval` seconds on a thread of its own until `stop`."""

    def __init__(
        self,
        pool: Pool,
        interval: float,
        path: str,
        headers: Mapping[str, str],
        model: Callable[[], str | None],
        name: str,
    ) -> None:
        self.pool = pool
        self.interval = interval
        self.path = path
        self.model = model
        self.name = name
        self.client = httpx.Client(timeout=min(PROBE_TIMEOUT_S, interval), headers=dict(headers), trust_env=False)
        self.probes = 0  # rounds done (tests wait on it)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"health-{name}", daemon=True)
        pool.health_interval = interval

    def start(self) -> HealthProber:
        self._thread.start()
        return self

    def probe_all(self) -> None:
        for upstream in self.pool.upstreams:
            try:
                problem = verdict(self.client.get(health_url(upstream, self.path)), self.model())
            except httpx.HTTPError as exc:
                problem = f"health probe failed: {type(exc).__name__}"
            if bool(problem) == upstream.healthy:  # a change: say so once
                log.warning("tier %s: upstream %s is %s", self.name, upstream.label, problem or "healthy again")
            self.pool.set_health(upstream, not problem, problem)
        self.probes += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.probe_all()
                self._stop.wait(self.interval)
        finally:
            self.client.close()  # here, not in `stop`: a probe in progress must not meet a closed client

    def stop(self) -> None:
        """Ends the probes (a probe in progress finishes first, within its timeout); never blocks."""
        self._stop.set()
        if not self._thread.is_alive():
            self.client.close()
