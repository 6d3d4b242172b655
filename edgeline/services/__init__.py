"""Real brokers as child processes, for the test harness, the benchmarks and the demo.

* :mod:`.process`: the child-process base (free ports, waiting for them, spawning, stopping, log tails)
  and the errors every service raises.
* :class:`MosquittoBroker` (:mod:`.mosquitto`) runs Debian's ``mosquitto`` on a free loopback port
  with a temp config.
* :class:`EmbeddedBroker` (:mod:`.embedded_broker`) runs the pure-Python ``amqtt`` broker in a
  background thread, for machines without Mosquitto (the demo on a laptop);
  :func:`start_mqtt_broker` (:mod:`.mqtt`) picks one of the two.
* :class:`KafkaBroker` (:mod:`.kafka`) runs Apache Kafka 3.9.1 in KRaft mode (one node, broker +
  controller) from the Maven Central jars that ``scripts/install-test-deps.sh`` puts in the cache folder.
* :class:`PostgresServer` (:mod:`.postgres`) runs Debian's PostgreSQL (a fresh cluster) for
  central's registry tests.
* :func:`scrape_metrics` (:mod:`.prometheus`) reads a Prometheus endpoint.

Every service has ``start()``, ``stop()``, ``host``/``port``, works as a context manager, and
raises :class:`ServiceUnavailable` when what it needs is not installed, or :class:`ServiceError`
(with the tail of its log) when it does not come up in time.
"""

from edgeline.services.embedded_broker import EmbeddedBroker
from edgeline.services.kafka import KAFKA_VERSION, KafkaBroker, edgeline_cache_dir, java_path, kafka_lib_dir
from edgeline.services.mosquitto import MosquittoBroker, mosquitto_path
from edgeline.services.mqtt import MqttBroker, start_mqtt_broker
from edgeline.services.postgres import PostgresServer, postgres_bindir
from edgeline.services.process import (LOOPBACK, ServiceError, ServiceUnavailable, free_port, port_open, tail,
                                       wait_for_port)
from edgeline.services.prometheus import scrape_metrics

__all__ = [
    "KAFKA_VERSION",
    "LOOPBACK",
    "EmbeddedBroker",
    "KafkaBroker",
    "MosquittoBroker",
    "MqttBroker",
    "PostgresServer",
    "ServiceError",
    "ServiceUnavailable",
    "edgeline_cache_dir",
    "free_port",
    "java_path",
    "kafka_lib_dir",
    "mosquitto_path",
    "port_open",
    "postgres_bindir",
    "scrape_metrics",
    "start_mqtt_broker",
    "tail",
    "wait_for_port",
]
