"""The ring runtime: communicators, layouts, strategies and the block schedule."""
