"""The HTTP/1.1 server for ASGI apps: the listener and connection cap (``server``), one
connection's loop (``connection``), request framing on llhttp (``parse``), response framing
(``response``), limits (``limits``) and the ASGI lifespan (``lifespan``).
"""
