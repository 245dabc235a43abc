"""Serve bundles over HTTP: a shared pool of adapters, dynamic batching, an API and a page."""
