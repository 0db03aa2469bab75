"""The upstream client: a keep-alive HTTP/1.1 pool to workers (``pool``) and one
connection's bytes, limits and errors (``connection``).
"""
