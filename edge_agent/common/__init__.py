"""Small helpers every wing shares (durable writes, hashing, backoff, JSON, URLs, HTTP); they
import nothing else of ``edge_agent`` but ``errors``."""
