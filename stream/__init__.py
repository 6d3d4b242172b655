"""Edgeline stream: message schemas, topics, MQTT/Kafka plumbing and the pure rules engine."""
