"""The tgis router and launcher: client gRPC API, batching, detokenization, metrics. No torch."""
