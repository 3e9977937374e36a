"""Engines: the code that runs a model inside a shard. Each is registered as a plugin."""
