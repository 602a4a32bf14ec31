"""Async services the GraphQL resolvers call."""
