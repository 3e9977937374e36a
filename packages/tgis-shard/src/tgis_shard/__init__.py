"""The tgis shard: runs a model on one rank and answers the router over a unix socket."""
