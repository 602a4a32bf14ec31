"""An in-process claims hook for the benchmark (CLAIMS_HOOK=bench.claims_hook:claims): what
a typical app's hook does without a round trip, a few claims derived from what it is told.
See bench/README.md, "refresh with a claims hook"."""

from __future__ import annotations

from typing import Any

from db.security.claims_hook import ClaimsRequest


async def claims(request: ClaimsRequest) -> dict[str, Any]:
    domain = request.email.rpartition("@")[2]
    return {
        "tenant": domain,
        "plan": "pro" if "admin" in request.roles else "free",
        "https://example.com/claims/reason": request.reason,
    }
