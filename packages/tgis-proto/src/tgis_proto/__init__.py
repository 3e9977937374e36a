"""Contracts of tgis: the client (``fmaas``) and shard gRPC protocols and the plugin hooks."""
