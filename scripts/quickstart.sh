#!/usr/bin/env bash
# The README's first command: install what Hangar needs, build it, start it, run the example
# agent in a sandbox, talk to it, suspend it to zero and resume it with its files intact.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-host-deps.sh
cargo build --release --bins

data=${HANGAR_DATA_DIR:-$PWD/.hangar}
port=${HANGAR_PORT:-7070}
export HANGAR_URL=http://127.0.0.1:$port
hangar=$PWD/target/release/hangar
mkdir -p "$data"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "hangar doctor"
"$hangar" doctor || true

step "building the example agent image (examples/hello) with buildah"
image=$(bash scripts/make-example-image.sh "$data/example-hello-oci")
echo "$image"

step "starting hangar serve on $HANGAR_URL (log: $data/serve.log)"
"$hangar" serve --data-dir "$data" --listen "127.0.0.1:$port" >"$data/serve.log" 2>&1 &
serve=$!
cleanup() { [ -n "${id:-}" ] && "$hangar" sandbox rm "$id" >/dev/null 2>&1; kill "$serve" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do curl -sf "$HANGAR_URL/healthz" >/dev/null && break; sleep 0.1; done

step "creating a sandbox from the image"
id=$("$hangar" sandbox create --image "$image")
"$hangar" sandbox ls

step "the agent answers on its port, through the sandbox's agent.sock"
for _ in $(seq 50); do
  reply=$(curl -s --unix-socket "$data/sandboxes/$id/run/agent.sock" http://agent/index.html || true)
  [ -n "$reply" ] && break; sleep 0.1
done
echo "$reply"

step "exec inside: who, where, and a file in the workspace"
"$hangar" sandbox exec "$id" -- sh -c 'echo "user $(id -un) in $(pwd), $GREETING"; echo "remember me" > notes.txt'
"$hangar" sandbox exec "$id" -- sh -c 'c=0; while true; do c=$((c+1)); echo $c > /tmp/counter; sleep 0.1; done >/dev/null 2>&1 &'
sleep 1
echo "counter before suspend: $("$hangar" sandbox exec "$id" -- cat /tmp/counter)"

step "suspend (scale to zero) and resume"
"$hangar" sandbox suspend "$id"
"$hangar" sandbox resume "$id"
echo "notes.txt after resume: $("$hangar" sandbox exec "$id" -- cat notes.txt)"
echo "counter after resume:   $("$hangar" sandbox exec "$id" -- cat /tmp/counter) (gvisor keeps processes running across suspend)"

step "deleting the sandbox"
"$hangar" sandbox rm "$id"
id=
echo "done: Hangar's data is in $data"
