"""A stand-in for the Bot Framework on loopback: its OpenID configuration and keys, a token
endpoint, and a connector that records the replies it is sent. Tokens are minted with PyJWT
and a fresh RSA key, the way the real channel signs them.

    fake_channel.py PORT_FILE        (writes the port it listens on, then serves)

    GET  /openid, /keys                     the OpenID configuration and JWKS
    GET  /.well-known/openid-configuration  the same, as an OIDC provider whose issuer is this URL
    POST /sign   {"aud", "sub"?, "serviceurl"?, "iss"?, "exp_in"?, "nbf_in"?, "alg"?, "key"?}
                                            -> {"token"}; alg "none" mints an unsigned token,
                                               key "other" signs with a key the JWKS lacks
    POST /token                             client credentials -> {"access_token", ...}
    POST /v3/conversations/...              a reply; recorded with its time and headers
    GET  /recorded                          everything recorded (token requests and replies)
"""

import base64
import hashlib
import hmac
import json
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://api.botframework.com"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KID = "fake-channel-key"
RECORDED = []
LOCK = threading.Lock()


def jwk():
    k = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    # The Bot Framework's keys carry endorsements (channel ids); clients must accept them.
    return {**k, "kid": KID, "use": "sig", "alg": "RS256", "endorsements": ["msteams", "test"]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("fake_channel: " + (fmt % args) + "\n")

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path == "/openid":
            return self.send_json(200, {
                "issuer": ISSUER,
                "jwks_uri": f"http://127.0.0.1:{port}/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
            })
        if self.path == "/.well-known/openid-configuration":
            # As an OpenID Connect provider of its own (the issuer is this server).
            return self.send_json(200, {
                "issuer": f"http://127.0.0.1:{port}",
                "jwks_uri": f"http://127.0.0.1:{port}/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
            })
        if self.path == "/keys":
            return self.send_json(200, {"keys": [jwk()]})
        if self.path == "/recorded":
            with LOCK:
                return self.send_json(200, list(RECORDED))
        self.send_json(404, {"error": "no route"})

    def do_POST(self):
        raw = self.body()
        if self.path == "/sign":
            req = json.loads(raw)
            now = int(time.time())
            claims = {
                "iss": req.get("iss", ISSUER),
                "aud": req["aud"],
                "iat": now,
                "nbf": now + int(req.get("nbf_in", -10)),
                "exp": now + int(req.get("exp_in", 3600)),
            }
            if "serviceurl" in req:
                claims["serviceurl"] = req["serviceurl"]
            if "sub" in req:
                claims["sub"] = req["sub"]
            alg = req.get("alg", "RS256")
            if alg == "HS256":
                # The key-confusion attack: HMAC keyed with the channel's public key, which
                # anyone can fetch. PyJWT refuses to do it, so it is done by hand.
                pem = KEY.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
                signing = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KID}).encode()) + b"." + b64(json.dumps(claims).encode())
                token = (signing + b"." + b64(hmac.new(pem, signing, hashlib.sha256).digest())).decode()
            elif alg == "none":
                token = jwt.encode(claims, None, algorithm="none", headers={"kid": KID})
            else:
                key = OTHER if req.get("key") == "other" else KEY
                token = jwt.encode(claims, key, algorithm=alg, headers={"kid": KID})
            return self.send_json(200, {"token": token})
        if self.path == "/token":
            form = dict(urllib.parse.parse_qsl(raw.decode()))
            with LOCK:
                RECORDED.append({"kind": "token", "t": time.time(), "form": form})
            if form.get("client_secret") != "s3cret-value":
                return self.send_json(401, {"error": "invalid_client", "error_description": "bad secret"})
            return self.send_json(200, {"token_type": "Bearer", "expires_in": 3600, "access_token": "bot-token-" + form.get("client_id", "")})
        if self.path.startswith("/v3/conversations/"):
            with LOCK:
                RECORDED.append({
                    "kind": "reply",
                    "t": time.time(),
                    "path": self.path,
                    "authorization": self.headers.get("authorization"),
                    "content_type": self.headers.get("content-type"),
                    "body": json.loads(raw or b"null"),
                })
            return self.send_json(200, {"id": str(uuid.uuid4())})
        self.send_json(404, {"error": "no route"})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()
