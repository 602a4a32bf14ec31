"""Persistence and the domain rules of Strawgate. Knows nothing of GraphQL or HTTP."""
