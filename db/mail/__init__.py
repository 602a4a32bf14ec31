"""Mail: templates, rendering, transports, the outbox and its sender."""
