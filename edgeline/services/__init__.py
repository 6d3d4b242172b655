"""Real brokers as child processes, for the test harness, the benchmarks and the demo."""

from edgeline.services.process import *  # noqa: F403 - the split into modules follows in the next commit
from edgeline.services.process import PostgresServer, scrape_metrics  # noqa: F401
