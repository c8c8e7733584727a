#!/bin/sh
# Print the control plane's Secrets (and the public key set's ConfigMap) as YAML, one Secret per
# process holding only what that process reads (docs/kubernetes.md, "Secrets"):
#
#   agentplane-config     DATABASE_URL REDIS_URL AGENTPLANE_ENCRYPTION_KEY signing-key.pem
#   agentplane-inference  REDIS_URL signing-key.pem
#   agentplane-toolexec   DATABASE_URL REDIS_URL signing-key.pem
#   agentplane-chat       DATABASE_URL REDIS_URL signing-key.pem
#   agentplane-migrate    DATABASE_URL
#   agentplane-jwks       (ConfigMap) jwks.json: public keys only
#
# Usage:
#   agentplane keys init ./keys                      # once: users.pem, one key per service, jwks.json
#   DATABASE_URL=postgresql://... REDIS_URL=redis://... AGENTPLANE_ENCRYPTION_KEY=k1:... \
#     deploy/secrets.sh ./keys | kubectl create -f -
#   deploy/secrets.sh --dev ./keys | kubectl create -f -   # dev overlay: makes passwords, the
#                                                          # in-cluster URLs and an encryption key
#
# `kubectl create` (not apply) refuses to overwrite Secrets that exist: new dev passwords would
# not match the database initialised with the old ones. The user issuer key (users.pem) is never
# put in the cluster. Needs kubectl (it formats the objects; no cluster is contacted).
set -eu

NAMESPACE=${NAMESPACE:-agentplane}
dev=false
if [ "${1:-}" = "--dev" ]; then
    dev=true
    shift
fi
keys=${1:-}
if [ -z "$keys" ] || [ ! -f "$keys/jwks.json" ]; then
    echo "usage: $0 [--dev] KEYS_DIR   (KEYS_DIR from \`agentplane keys init KEYS_DIR\`)" >&2
    exit 2
fi
for service in config inference toolexec chat; do
    if [ ! -f "$keys/$service.pem" ]; then
        echo "$0: $keys/$service.pem is missing: run \`agentplane keys init $keys\`" >&2
        exit 2
    fi
done

random() { head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; }

if $dev; then
    pg_password=$(random)
    redis_password=$(random)
    DATABASE_URL="postgresql://agentplane:$pg_password@postgres:5432/agentplane"
    REDIS_URL="redis://:$redis_password@redis:6379/0"
    AGENTPLANE_ENCRYPTION_KEY="k1:$(random)"
fi
: "${DATABASE_URL:?set DATABASE_URL (or use --dev)}"
: "${REDIS_URL:?set REDIS_URL (or use --dev)}"
: "${AGENTPLANE_ENCRYPTION_KEY:?set AGENTPLANE_ENCRYPTION_KEY, e.g. k1:<32 random bytes, base64url> (or use --dev)}"

secret() {
    name=$1
    shift
    echo "---"
    kubectl create secret generic "$name" -n "$NAMESPACE" --dry-run=client -o yaml "$@"
}

secret agentplane-config \
    --from-literal=DATABASE_URL="$DATABASE_URL" --from-literal=REDIS_URL="$REDIS_URL" \
    --from-literal=AGENTPLANE_ENCRYPTION_KEY="$AGENTPLANE_ENCRYPTION_KEY" \
    --from-file=signing-key.pem="$keys/config.pem"
secret agentplane-inference \
    --from-literal=REDIS_URL="$REDIS_URL" --from-file=signing-key.pem="$keys/inference.pem"
secret agentplane-toolexec \
    --from-literal=DATABASE_URL="$DATABASE_URL" --from-literal=REDIS_URL="$REDIS_URL" \
    --from-file=signing-key.pem="$keys/toolexec.pem"
secret agentplane-chat \
    --from-literal=DATABASE_URL="$DATABASE_URL" --from-literal=REDIS_URL="$REDIS_URL" \
    --from-file=signing-key.pem="$keys/chat.pem"
secret agentplane-migrate --from-literal=DATABASE_URL="$DATABASE_URL"
if $dev; then
    secret postgres --from-literal=POSTGRES_PASSWORD="$pg_password"
    secret redis --from-literal=REDIS_PASSWORD="$redis_password"
fi
echo "---"
kubectl create configmap agentplane-jwks -n "$NAMESPACE" --dry-run=client -o yaml --from-file=jwks.json="$keys/jwks.json"
