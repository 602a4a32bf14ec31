"""The GraphQL edge of Strawgate: app factory, context, schema, resolvers, CLI."""
