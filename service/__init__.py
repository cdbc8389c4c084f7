"""relay: a WebSocket group relay. Stateless pods, one broker between them."""

__version__ = "0.1.0"
