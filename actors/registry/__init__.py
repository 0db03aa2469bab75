"""The actors: the registry task that owns the worker table, the registration workflows,
detection, health checks, drains, and the Gateway handle that ties them together.
"""
