"""Identity providers Strawgate signs in with (OpenID Connect, and GitHub's OAuth 2.0): their
settings (config.py), the outbound HTTP they are reached by (http.py), and what each kind
proves (oidc.py, github.py). The account decisions are db/services/signin/identity.py's."""
