"""Webhooks: events written in the transaction of the change they report (the outbox), and
delivered, signed per the Standard Webhooks spec, at least once to the endpoints of
WEBHOOK_ENDPOINTS."""
