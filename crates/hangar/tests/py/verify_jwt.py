"""Verifies a JWT the way a tool or MCP server would: against the issuer's published key set,
with PyJWT. Prints the claims as JSON, or exits 1 with the reason.
Usage: verify_jwt.py JWKS_URL ISSUER AUDIENCE TOKEN"""

import json
import sys

import jwt

jwks_url, issuer, audience, token = sys.argv[1:5]
try:
    key = jwt.PyJWKClient(jwks_url).get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        issuer=issuer,
        audience=audience,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )
except Exception as e:  # noqa: BLE001 - the reason is the output
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"claims": claims, "header": jwt.get_unverified_header(token)}))
