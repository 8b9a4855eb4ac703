#!/usr/bin/env bash
# The README's first command: install what Hangar needs, build it, start it, make the Debian
# base image, deploy the `notes` example agent, talk to it, scale its session to zero, talk to
# it again (a transparent resume) and show that its notes survived.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "installing host packages (scripts/install-host-deps.sh)"
bash scripts/install-host-deps.sh
step "building Hangar (cargo build --release)"
cargo build --release --bins

data=${HANGAR_DATA_DIR:-$PWD/.hangar}
port=${HANGAR_PORT:-7070}
export HANGAR_URL=http://127.0.0.1:$port
export HANGAR_DATA_DIR=$data   # where the CLI finds the admin key hangar serve makes
hangar=$PWD/target/release/hangar
mkdir -p "$data"

step "hangar doctor"
"$hangar" doctor || true

step "starting hangar serve on $HANGAR_URL (data in $data, log in $data/serve.log)"
"$hangar" serve --data-dir "$data" --listen "127.0.0.1:$port" >>"$data/serve.log" 2>&1 &
serve=$!
session=
stop() {
  # Leave nothing running: the demo session scales to zero, then the server stops. Both come
  # back on the next run (or `hangar serve --data-dir ...`).
  [ -n "$session" ] && "$hangar" sessions suspend "$session" >/dev/null 2>&1 || true
  kill $serve 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 300); do curl -sf "$HANGAR_URL/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "$HANGAR_URL/healthz" >/dev/null || { tail -20 "$data/serve.log"; exit 1; }

step "the base image: Debian 12 with python3, made with debootstrap (cached after the first time)"
"$hangar" images bootstrap debian:bookworm --packages python3,python3-venv

step "hangar deploy examples/notes (builds its Dockerfile with buildah, creates version N)"
"$hangar" deploy examples/notes
"$hangar" agents

user=demo-$RANDOM
step "talking to it as user $user: every user gets their own session and sandbox"
errs=$(mktemp)
"$hangar" invoke notes "note: buy milk" --user "$user" 2>"$errs"
cat "$errs" >&2
session=$(sed -n 's/^session \(sess_[0-9a-f]*\).*/\1/p' "$errs")
rm -f "$errs"
[ -n "$session" ] || { echo "no session id in the answer" >&2; exit 1; }
"$hangar" invoke notes "note: call the plumber" --user "$user" --session "$session"
"$hangar" invoke notes "what are my notes?" --user "$user" --session "$session"

step "scaling the session to zero (what idle_timeout does by itself after 15 minutes)"
"$hangar" sessions suspend "$session"
"$hangar" sessions ls notes --user "$user"

step "the next message resumes it transparently; the notes are still there"
"$hangar" invoke notes "what are my notes?" --user "$user" --session "$session"
"$hangar" sessions ls notes --user "$user"

step "the same endpoint speaks the OpenAI Responses API"
cat <<EOF
  from openai import OpenAI
  client = OpenAI(base_url="$HANGAR_URL/agents/notes", api_key=open("$data/admin-key").read().strip())
  r = client.responses.create(input="note: it works", extra_headers={"x-agent-user-id": "$user"})
  print(r.output_text)
EOF
echo
echo "done. The session is suspended and the server stops as this script exits; the data stays in $data."
echo "Start it again with \`$hangar serve --data-dir $data --listen 127.0.0.1:$port\`: the agent, its"
echo "versions and the session (with its notes) are all still there."
