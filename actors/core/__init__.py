"""The pure core: values, URLs, errors, commands, the worker table and its indexes, jobs,
snapshots, the codec, config and the validation and address rules. Nothing here imports trio,
httpx or any I/O library (a test checks it): every rule is a plain synchronous call.
"""
