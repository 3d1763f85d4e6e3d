"""What operators see: Prometheus metrics, JSON logs, one access line per request."""
