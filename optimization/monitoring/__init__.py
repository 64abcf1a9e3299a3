"""Monitoring our server: its Prometheus metrics scraped by a real Prometheus, a terminal live view, and a Grafana
dashboard (see README.md)."""
