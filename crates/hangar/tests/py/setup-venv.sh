#!/bin/sh
# Create (or reuse) the virtualenv the end-to-end tests run their Python clients in.
#
#   crates/hangar/tests/py/setup-venv.sh      -> prints the venv's absolute path on stdout
#
# The venv lives at ${HANGAR_TEST_VENV:-target/test-venv} (a relative path is taken from the workspace
# root). It is made with Debian's /usr/bin/python3 -m venv and gets requirements.txt. Idempotent: when
# the venv exists and was filled from the same requirements.txt, it returns at once without touching
# the network. Concurrent callers are serialised with flock.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../../.." && pwd)
req="$here/requirements.txt"
venv=${HANGAR_TEST_VENV:-target/test-venv}
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac

if [ -x /usr/bin/python3 ]; then py=/usr/bin/python3; else py=$(command -v python3); fi
want=$(sha256sum "$req" | cut -d' ' -f1)
stamp="$venv/.hangar-requirements.sha256"

ready() {
    [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("openai") is None)' 2>/dev/null
}

if ready; then
    echo "$venv"
    exit 0
fi

mkdir -p "$(dirname "$venv")"
lock="$venv.lock"
exec 9>"$lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi
if ready; then  # somebody else finished it while we waited
    echo "$venv"
    exit 0
fi

echo "setup-venv: creating $venv with $py" >&2
if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    if ! "$py" -m venv "$venv" >&2; then
        echo "setup-venv: '$py -m venv' failed; on Debian: apt-get install python3-venv" >&2
        exit 1
    fi
fi
echo "setup-venv: pip install -r $req" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$req" >&2
echo "$want" >"$stamp"
echo "$venv"
