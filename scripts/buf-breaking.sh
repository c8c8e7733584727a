#!/bin/sh
# `make buf-breaking`: the API in proto/ (the working tree, uncommitted changes included) must not
# break the API it is compared against (buf.yaml's `breaking` rules, category FILE):
#   - the last release tag (v*), when there is one: what clients and stored data were built with;
#   - the commit this change starts from: the merge base with the remote's default branch
#     (origin/HEAD, origin/main or BUF_BREAKING_MAIN) on a branch, otherwise
#     the commit before HEAD. On main, and in CI where HEAD is the commit under test (a pull
#     request's merge commit has main as its first parent), a break fails the commit that makes it.
# BUF_BREAKING_AGAINST=<git ref> compares with that commit instead (for example an older release).
# Why it matters, and how to make a deliberate break: docs/api.md.
set -eu
cd "$(dirname "$0")/.."
buf="${BUF:-.venv/bin/buf}"

commit_of() { git rev-parse -q --verify "$1^{commit}" 2>/dev/null || true; }

# The main line a branch starts from: BUF_BREAKING_MAIN, else the remote's default branch.
main="${BUF_BREAKING_MAIN:-}"
if [ -z "$main" ]; then
    for candidate in origin/HEAD origin/main origin/master; do
        if [ -n "$(commit_of "$candidate")" ]; then
            main=$candidate
            break
        fi
    done
fi

if ! git rev-parse -q --verify HEAD >/dev/null 2>&1; then
    echo "buf-breaking: no commit yet, so no API to compare against"
    exit 0
fi

bases=""
if [ -n "${BUF_BREAKING_AGAINST:-}" ]; then
    bases=$(commit_of "$BUF_BREAKING_AGAINST")
    if [ -z "$bases" ]; then
        echo "buf-breaking: BUF_BREAKING_AGAINST=$BUF_BREAKING_AGAINST is not a commit" >&2
        exit 2
    fi
else
    tag=$(git describe --tags --abbrev=0 --match 'v[0-9]*' HEAD 2>/dev/null || true)
    if [ -n "$tag" ]; then
        bases=$(commit_of "$tag")
    fi
    head=$(git rev-parse HEAD)
    start=""
    if [ -n "$main" ]; then
        start=$(git merge-base HEAD "$main" 2>/dev/null || true)
    fi
    if [ -z "$start" ] || [ "$start" = "$head" ]; then
        start=$(commit_of HEAD^)
    fi
    if [ -z "$start" ]; then
        if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
            # A depth-1 clone (some CI checkouts) cannot see the commit before HEAD: say so loudly
            # and check what it can, the uncommitted changes; a full clone checks the last commit.
            echo "buf-breaking: WARNING: this shallow clone lacks the commit before HEAD, so only" \
                "uncommitted changes are checked (git fetch --deepen=1, or set BUF_BREAKING_AGAINST)" >&2
        fi
        start=$head # the first commit (or a shallow clone): only uncommitted changes can break it
    fi
    bases="$bases $start"
fi

status=0
seen=""
for base in $bases; do
    case " $seen " in *" $base "*) continue ;; esac
    seen="$seen $base"
    label=$(git log -1 --format='%h %s' "$base" | cut -c1-90)
    if ! git cat-file -e "$base:proto" 2>/dev/null; then
        echo "buf-breaking: $label has no proto/, so no API to compare against"
        continue
    fi
    echo "buf breaking: proto/ against $label"
    "$buf" breaking --against ".git#ref=$base" || status=1
done
if [ "$status" -ne 0 ]; then
    echo "buf-breaking: the change above breaks the API (see docs/api.md)" >&2
fi
exit "$status"
