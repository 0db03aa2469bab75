"""The data plane: routing policies and their state, circuit breakers, in-flight counts,
metrics, the proxy, and the upstream connection pool.
"""
