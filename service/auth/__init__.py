"""Tokens: verifying bearer tokens (JWKS), the verified-token cache, development keys and issuing tokens."""
