"""The thought-memory method; its data pipeline so far (``streams.py``). Not registered yet."""
