"""fleetroute: the router service (proxy, configuration, discovery, health, state, metrics) and the CLI."""

__version__ = "0.1.0"
