"""digitserve."""
