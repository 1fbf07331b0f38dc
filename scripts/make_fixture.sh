#!/usr/bin/env bash
# Writes tests/fixtures/release-<rev>.tar.gz: a data and key directory written by the
# chatvault release at <rev> (built in a throwaway worktree), for the upgrade tests.
# Tenant acme (API key in api-key.txt); alice: chat-1 (3 messages, metadata order=42),
# chat-2 (closed); bob: chat-4 (replaced); carol: chat-5 (carol shredded, no rotation
# since); dave: chat-7 (deleted).   Usage: scripts/make_fixture.sh <commit>
set -euo pipefail
rev=${1:?usage: $0 <commit>}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; git -C "$root" worktree remove --force "$work/src" 2>/dev/null || true' EXIT
git -C "$root" worktree add --detach "$work/src" "$rev" >/dev/null
target=${FIXTURE_TARGET_DIR:-$work/target}
(cd "$work/src" && CARGO_TARGET_DIR="$target" cargo build --quiet --bin chatvault)
bin="$target/debug/chatvault"
out="$work/out"
mkdir -p "$out"
export CHATVAULT_ROOT_KEY=5f1e0d2c3b4a59687766554433221100ffeeddccbbaa99887766554433221100
export CHATVAULT_REGION=eu  # one region; releases before regions ignore it
export CHATVAULT_OPERATOR_TOKEN=test-operator-token-0123456789abcdef
env -u CHATVAULT_CONFIG "$bin" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --data-dir "$out/data" --key-dir "$out/keys" >"$work/serve.out" 2>"$work/serve.err" &
pid=$!
for _ in $(seq 100); do grep -q "^chatvault listening on" "$work/serve.out" && break; sleep 0.2; done
grep -q "^chatvault listening on" "$work/serve.out" || { echo "the release did not start:" >&2; cat "$work/serve.err" >&2; exit 1; }
data=$(sed -n 's/^chatvault listening on //p' "$work/serve.out")
admin=$(sed -n 's/^chatvault admin listening on //p' "$work/serve.out")
cv() { "$bin" "$@"; }
# Releases since regions need the tenant's region; those before take no such flag.
if "$bin" admin tenant create --help | grep -q -- --region; then region=(--region eu); else region=(); fi
cv admin --admin-server "http://$admin" tenant create acme "${region[@]}" --allow 127.0.0.0/8 >/dev/null
key=$(cv admin --admin-server "http://$admin" key issue acme --raw)
echo "$key" >"$out/api-key.txt"
export CHATVAULT_API_KEY=$key CHATVAULT_SERVER="http://$data"
cv put --subject alice@example.com --transcript chat-1 --meta order=42 \
  -m "visitor:Alice:Hi, my order is late" -m "agent:Bob:Let me check" >/dev/null
cv append --transcript chat-1 -m "visitor:Alice:Thanks!" >/dev/null
cv put --subject alice@example.com --transcript chat-2 -m "visitor:Alice:Another question" >/dev/null
cv close --transcript chat-2 >/dev/null
cv put --subject bob@example.com --transcript chat-4 -m "visitor:Bob:first version" >/dev/null
cv put --subject bob@example.com --transcript chat-4 -m "visitor:Bob:replaced version" >/dev/null
cv put --subject carol@example.com --transcript chat-5 -m "visitor:Carol:erase me" >/dev/null
cv shred --subject carol@example.com >/dev/null
cv put --subject dave@example.com --transcript chat-7 -m "visitor:Dave:delete this chat" >/dev/null
cv delete --transcript chat-7 >/dev/null
kill -TERM "$pid"
wait "$pid" || true
short=$(git -C "$root" rev-parse --short=7 "$rev")
tar czf "$root/tests/fixtures/release-$short.tar.gz" -C "$out" data keys api-key.txt
echo "tests/fixtures/release-$short.tar.gz"
