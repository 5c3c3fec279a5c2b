"""The SNI router's runtime: config, routes, supervisor, workers, relay, limits, metrics."""
